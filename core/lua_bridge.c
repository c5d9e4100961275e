/*
 * lua_bridge — the Lua 5.4 policy engine: owns the Lua states (the current
 * one and older ones kept alive by calls that started on them), the calls
 * in progress with their coroutines, timers and DNS queries. It turns
 * plua_args into read-only views and hook results into plua_result; what a
 * verdict means is the caller's business (smtp_server, scheduler).
 *
 * A call: plua_call() arms a 0 ms timer (so the callback never fires inside
 * plua_call), the timer starts the coroutine; petrel.sleep arms the same
 * timer and yields, petrel.dns.* start a query and yield; the timer or the
 * DNS callback resumes the coroutine after checking that the call is still
 * waiting for that very event (wait kind and generation; a cancelled call
 * has stopped its timer and cancelled its query, so stale events cannot
 * arrive). When the coroutine returns or fails, every view it was given is
 * marked expired, the callback fires and the call is freed.
 */
#include "lua_bridge.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "config.h"
#include "dns.h"
#include "log.h"
#include "timer.h"
#include "util.h"

static const char *const plua_hooks[] = {
    "connect", "helo",          "auth",  "mail_from", "rcpt_to", "data", "xbind",
    "route",   "select_source", "retry", "bounce",    "event",   NULL,
};

#define PLUA_HOOKS_KEY "petrel.hooks"
#define PLUA_STATE_KEY "petrel.state"
#define PLUA_VERDICT_MT "petrel.verdict"

struct plua_state {
    lua_State *L;   /* owned */
    struct plua *p; /* borrowed: the engine */
    unsigned refs;  /* 1 while current + 1 per call on it */
};

enum plua_wait { WAIT_NONE, WAIT_START, WAIT_SLEEP, WAIT_DNS };

struct plua_call {
    struct plua *p;        /* borrowed: the engine */
    struct plua_state *st; /* counted reference */
    struct plua_call *next, *prev;
    char hook[16];
    char key[40];  /* log key: queue id or NOQUEUE */
    lua_State *co; /* borrowed: anchored by co_ref */
    int co_ref;
    int views_ref;          /* table of the views handed out */
    struct timer *timer;    /* owned: start and sleep */
    struct timer *deadline; /* owned or NULL: whole-call deadline, armed at the first wait
                             * (a hook that never waits is bounded by the count hook) */
    int64_t started_ms;     /* when plua_call was made: the deadline counts from it */
    struct dns_query *q;    /* pending lookup, or NULL */
    bool q_mx;
    enum plua_wait wait;
    unsigned gen; /* bumped at each yield */
    bool in_cb;
    uint64_t insns; /* instructions run so far */
    int64_t run_ms; /* wall time spent running (not waiting) */
    int64_t run_start;
    plua_cb *cb;
    void *arg;
    struct plua_result res;
};

struct plua {
    struct uv_loop_s *loop; /* borrowed */
    struct dns *dns;        /* borrowed */
    struct plua_state *cur; /* counted reference */
    int on_error;           /* enum milter_action */
    uint64_t timeout_ms;
    struct plua_call *calls; /* in progress */
    size_t ncalls;
};

/* A view: data lives in user value 1 (a table), expired once the call ends. */
struct plua_view {
    bool expired;
    bool msg_writable;      /* data hook's msg: add_header allowed */
    struct plua_call *call; /* borrowed; used only while !expired */
};

static struct plua_call *
plua_call_of(lua_State *L)
{
    return *(struct plua_call **)lua_getextraspace(L);
}

/* ---- views ---- */

static struct plua_view *
plua_view_check(lua_State *L, int idx)
{
    struct plua_view *v = luaL_testudata(L, idx, "petrel.conn");
    if (v == NULL)
        v = luaL_testudata(L, idx, "petrel.msg");
    if (v == NULL)
        v = luaL_testudata(L, idx, "petrel.view");
    if (v == NULL)
        luaL_typeerror(L, idx, "petrel view");
    if (v->expired)
        luaL_error(L, "attempt to use an expired view");
    return v;
}

static int
plua_view_index(lua_State *L)
{
    plua_view_check(L, 1);
    if (lua_getmetatable(L, 1)) { /* methods first */
        lua_getfield(L, -1, "__methods");
        if (lua_istable(L, -1)) {
            lua_pushvalue(L, 2);
            if (lua_rawget(L, -2) != LUA_TNIL)
                return 1;
            lua_pop(L, 1);
        }
        lua_pop(L, 2);
    }
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, 2);
    lua_rawget(L, -2);
    return 1;
}

static int
plua_view_newindex(lua_State *L)
{
    plua_view_check(L, 1);
    return luaL_error(L, "attempt to modify a read-only view");
}

static int
plua_view_tostring(lua_State *L)
{
    struct plua_view *v = lua_touserdata(L, 1);
    lua_pushfstring(L, "petrel view (%s)", v != NULL && v->expired ? "expired" : "live");
    return 1;
}

static int
plua_msg_header(lua_State *L)
{
    plua_view_check(L, 1);
    const char *name = luaL_checkstring(L, 2);
    lua_getiuservalue(L, 1, 1);
    lua_getfield(L, -1, "headers");
    lua_Integer n = luaL_len(L, -1);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        lua_rawgeti(L, -1, 1);
        const char *h = lua_tostring(L, -1);
        if (h != NULL && ascii_casecmp(h, name) == 0) {
            lua_rawgeti(L, -2, 2);
            return 1;
        }
        lua_pop(L, 2);
    }
    lua_pushnil(L);
    return 1;
}

static bool
plua_header_ok(const char *s, bool name)
{
    if (*s == '\0' && name)
        return false;
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '\r' || c == '\n' || (name && (c <= ' ' || c == ':' || c >= 127)))
            return false;
    }
    return true;
}

static int
plua_msg_add_header(lua_State *L)
{
    struct plua_view *v = plua_view_check(L, 1);
    const char *name = luaL_checkstring(L, 2);
    const char *value = luaL_checkstring(L, 3);
    if (!v->msg_writable)
        return luaL_error(L, "msg:add_header is only allowed in the data hook");
    if (!plua_header_ok(name, true) || !plua_header_ok(value, false))
        return luaL_error(L, "msg:add_header: invalid header name or value");
    struct plua_result *r = &v->call->res;
    if (r->nadd_headers >= PLUA_MAX_ADD_HEADERS)
        return luaL_error(L, "msg:add_header: more than %d headers", PLUA_MAX_ADD_HEADERS);
    r->add_headers = xrealloc(r->add_headers, (r->nadd_headers + 1) * sizeof(*r->add_headers));
    r->add_headers[r->nadd_headers].name = xstrdup(name);
    r->add_headers[r->nadd_headers].value = xstrdup(value);
    r->nadd_headers++;
    return 0;
}

static const luaL_Reg plua_msg_methods[] = {
    {"header", plua_msg_header},
    {"add_header", plua_msg_add_header},
    {NULL, NULL},
};

static const luaL_Reg plua_view_meta[] = {
    {"__index", plua_view_index},
    {"__newindex", plua_view_newindex},
    {"__tostring", plua_view_tostring},
    {NULL, NULL},
};

/* Creates the view metatables in L. [-0, +0] */
static void
plua_views_init(lua_State *L)
{
    static const char *const names[] = {"petrel.conn", "petrel.msg", "petrel.view"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        luaL_newmetatable(L, names[i]);
        luaL_setfuncs(L, plua_view_meta, 0);
        if (strcmp(names[i], "petrel.msg") == 0) {
            luaL_newlib(L, plua_msg_methods);
            lua_setfield(L, -2, "__methods");
        }
        lua_pushliteral(L, "read-only view");
        lua_setfield(L, -2, "__metatable");
        lua_pop(L, 1);
    }
}

/* Wraps the table on top into a view of metatable mt, recorded in the
 * call's list of views. [-1, +1] */
static void
plua_view_wrap(struct plua_call *c, lua_State *L, const char *mt, bool writable)
{
    struct plua_view *v = lua_newuserdatauv(L, sizeof(*v), 1);
    v->expired = false;
    v->msg_writable = writable;
    v->call = c;
    luaL_setmetatable(L, mt);
    lua_rotate(L, -2, 1);        /* view, table */
    lua_setiuservalue(L, -2, 1); /* view */
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->views_ref);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, (lua_Integer)luaL_len(L, -2) + 1);
    lua_pop(L, 1);
}

static void
plua_setstr(lua_State *L, const char *k, const char *v) /* [-0, +0] on a table on top */
{
    if (v == NULL)
        return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static void
plua_push_conn(struct plua_call *c, lua_State *L, const struct plua_args *a) /* [-0, +1] */
{
    lua_createtable(L, 0, 4);
    plua_setstr(L, "ip", a->ip);
    lua_pushinteger(L, a->port);
    lua_setfield(L, -2, "port");
    plua_setstr(L, "local_ip", a->local_ip);
    plua_setstr(L, "listener", a->listener);
    plua_setstr(L, "helo", a->helo);
    if (strcmp(c->hook, "auth") != 0) /* there, user is the one trying: an argument */
        plua_setstr(L, "user", a->user); /* the authenticated user, or nil */
    plua_view_wrap(c, L, "petrel.conn", false);
}

static void
plua_push_txn(struct plua_call *c, lua_State *L, const struct plua_args *a) /* [-0, +1] */
{
    lua_createtable(L, 0, 3);
    plua_push_conn(c, L, a);
    lua_setfield(L, -2, "conn");
    plua_setstr(L, "from", a->from);
    plua_setstr(L, "params", a->params);
    plua_view_wrap(c, L, "petrel.view", false);
}

static void
plua_push_msg(struct plua_call *c, lua_State *L, const struct plua_args *a,
              bool writable) /* [-0, +1] */
{
    lua_createtable(L, 0, 4);
    plua_setstr(L, "id", a->queue_id);
    plua_setstr(L, "from", a->from);
    lua_pushinteger(L, (lua_Integer)a->size);
    lua_setfield(L, -2, "size");
    lua_pushinteger(L, (lua_Integer)a->age);
    lua_setfield(L, -2, "age");
    lua_createtable(L, (int)a->nheaders, 0);
    for (size_t i = 0; i < a->nheaders; i++) {
        lua_createtable(L, 2, 2);
        lua_pushstring(L, a->headers[i].name);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "name");
        lua_rawseti(L, -2, 1);
        lua_pushstring(L, a->headers[i].value);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "value");
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "headers");
    plua_view_wrap(c, L, "petrel.msg", writable);
}

static void
plua_push_reply(struct plua_call *c, lua_State *L, int code, const char *esc,
                const char *text) /* [-0, +1] */
{
    if (code == 0) {
        lua_pushnil(L);
        return;
    }
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, code);
    lua_setfield(L, -2, "code");
    plua_setstr(L, "enhanced", esc);
    plua_setstr(L, "text", text);
    plua_view_wrap(c, L, "petrel.view", false);
}

static void
plua_nilstr(lua_State *L, const char *s) /* [-0, +1] */
{
    if (s == NULL)
        lua_pushnil(L);
    else
        lua_pushstring(L, s);
}

/* Pushes the hook's arguments onto co; returns how many. */
static int
plua_push_args(struct plua_call *c, lua_State *co, const struct plua_args *a)
{
    const char *h = c->hook;
    if (strcmp(h, "connect") == 0) {
        plua_push_conn(c, co, a);
        return 1;
    }
    if (strcmp(h, "helo") == 0) {
        plua_push_conn(c, co, a);
        plua_nilstr(co, a->helo);
        return 2;
    }
    if (strcmp(h, "auth") == 0) {
        plua_push_conn(c, co, a);
        plua_nilstr(co, a->user);
        plua_nilstr(co, a->password);
        return 3;
    }
    if (strcmp(h, "mail_from") == 0) {
        plua_push_txn(c, co, a);
        return 1;
    }
    if (strcmp(h, "rcpt_to") == 0) {
        plua_push_txn(c, co, a);
        plua_nilstr(co, a->rcpt);
        return 2;
    }
    if (strcmp(h, "data") == 0) {
        plua_push_txn(c, co, a);
        plua_push_msg(c, co, a, true);
        return 2;
    }
    if (strcmp(h, "xbind") == 0) {
        plua_push_conn(c, co, a);
        plua_nilstr(co, a->xbind_ip);
        plua_nilstr(co, a->xbind_hostname);
        return 3;
    }
    if (strcmp(h, "route") == 0) {
        plua_push_msg(c, co, a, false);
        plua_nilstr(co, a->rcpt);
        return 2;
    }
    if (strcmp(h, "select_source") == 0) {
        plua_push_msg(c, co, a, false);
        plua_nilstr(co, a->destination);
        return 2;
    }
    if (strcmp(h, "retry") == 0) {
        plua_push_msg(c, co, a, false);
        plua_nilstr(co, a->rcpt);
        lua_pushinteger(co, a->attempt);
        plua_push_reply(c, co, a->reply_code, a->reply_esc, a->reply_text);
        return 4;
    }
    if (strcmp(h, "bounce") == 0) {
        plua_push_msg(c, co, a, false);
        lua_createtable(co, (int)a->nfailures, 0);
        for (size_t i = 0; i < a->nfailures; i++) {
            const struct plua_failure *f = &a->failures[i];
            lua_createtable(co, 0, 2);
            plua_setstr(co, "rcpt", f->rcpt);
            plua_push_reply(c, co, f->code, f->esc, f->text);
            lua_setfield(co, -2, "reply");
            lua_rawseti(co, -2, (lua_Integer)i + 1);
        }
        plua_view_wrap(c, co, "petrel.view", false);
        return 2;
    }
    /* event */
    lua_createtable(co, 0, 4);
    plua_setstr(co, "type", a->event_type);
    plua_setstr(co, "id", a->queue_id);
    plua_setstr(co, "rcpt", a->rcpt);
    plua_push_reply(c, co, a->reply_code, a->reply_esc, a->reply_text);
    lua_setfield(co, -2, "reply");
    plua_view_wrap(c, co, "petrel.view", false);
    return 1;
}

/* ---- verdicts ---- */

/* petrel.reject / petrel.tempfail: validates and returns a verdict table. */
static int
plua_make_refusal(lua_State *L, const char *kind, int lo)
{
    lua_Integer code = luaL_checkinteger(L, 1);
    const char *s = luaL_optstring(L, 2, "");
    if (code < lo || code > lo + 99)
        return luaL_error(L, "petrel.%s: code %d is not %dxx", kind, (int)code, lo / 100);
    char esc[16];
    const char *text;
    const char *why = verdict_split_text(s, lo == 500 ? "5.7.1" : "4.7.1", esc, sizeof(esc), &text);
    if (why != NULL)
        return luaL_error(L, "petrel.%s: %s", kind, why);
    if (!reply_check((int)code, esc))
        return luaL_error(L, "petrel.%s: enhanced code %s does not match %d", kind, esc, (int)code);
    if (strpbrk(text, "\r\n") != NULL)
        return luaL_error(L, "petrel.%s: text holds CR or LF", kind);
    lua_createtable(L, 0, 4);
    lua_pushstring(L, kind);
    lua_setfield(L, -2, "action");
    lua_pushinteger(L, code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, esc);
    lua_setfield(L, -2, "enhanced");
    lua_pushstring(L, text);
    lua_setfield(L, -2, "text");
    luaL_setmetatable(L, PLUA_VERDICT_MT);
    return 1;
}

static int
plua_petrel_reject(lua_State *L)
{
    return plua_make_refusal(L, "reject", 500);
}

static int
plua_petrel_tempfail(lua_State *L)
{
    return plua_make_refusal(L, "tempfail", 400);
}

static int
plua_petrel_accept(lua_State *L)
{
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "accept");
    lua_setfield(L, -2, "action");
    luaL_setmetatable(L, PLUA_VERDICT_MT);
    return 1;
}

/* ---- petrel.log, petrel.on ---- */

static int
plua_petrel_log(lua_State *L)
{
    const char *lv = luaL_checkstring(L, 1);
    enum log_level level;
    if (!log_level_parse(lv, &level))
        return luaL_error(L, "petrel.log: unknown level '%s'", lv);
    int n = lua_gettop(L);
    lua_getglobal(L, "string");
    lua_getfield(L, -1, "format");
    for (int i = 2; i <= n; i++)
        lua_pushvalue(L, i);
    lua_call(L, n - 1, 1);
    const char *s = lua_tostring(L, -1);
    struct plua_call *c = plua_call_of(L);
    lua_Debug ar;
    const char *where = "?";
    int line = 0;
    if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "Sl", &ar)) {
        where = ar.short_src;
        line = ar.currentline;
    }
    log_msg(level, c != NULL ? c->key : "NOQUEUE", "lua: %s:%d: %s", where, line,
            s != NULL ? s : "");
    return 0;
}

static int
plua_petrel_on(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (!plua_hook_known(name))
        return luaL_error(L, "petrel.on: unknown hook '%s'", name);
    lua_getfield(L, LUA_REGISTRYINDEX, PLUA_HOOKS_KEY);
    lua_pushvalue(L, 2);
    lua_setfield(L, -2, name);
    return 0;
}

/* ---- async helpers ---- */

static struct plua_call *
plua_async_call(lua_State *L, const char *what)
{
    struct plua_call *c = plua_call_of(L);
    if (c == NULL || c->co != L || !lua_isyieldable(L))
        luaL_error(L, "%s may only be called from a hook's own coroutine", what);
    return c;
}

static void plua_deadline_fired(struct timer *t, void *arg);

/* Before the first wait: arms the whole-call deadline for the time left
 * of it since plua_call (creating the timer then saves it for the hooks
 * that never wait, most of them). */
static void
plua_arm_deadline(struct plua_call *c)
{
    if (c->deadline != NULL)
        return;
    uint64_t dl = c->p->timeout_ms * PLUA_DEADLINE_FACTOR;
    if (dl < PLUA_DEADLINE_MIN_MS)
        dl = PLUA_DEADLINE_MIN_MS;
    int64_t spent = now_ms() - c->started_ms;
    uint64_t left = spent <= 0 ? dl : (uint64_t)spent >= dl ? 0 : dl - (uint64_t)spent;
    c->deadline = timer_new(c->p->loop, plua_deadline_fired, c);
    timer_set_ref(c->deadline, 0);
    timer_arm(c->deadline, left);
}

static int
plua_petrel_sleep(lua_State *L)
{
    lua_Number s = luaL_checknumber(L, 1);
    struct plua_call *c = plua_async_call(L, "petrel.sleep");
    if (!(s >= 0) || s > 86400)
        return luaL_error(L, "petrel.sleep: bad duration");
    c->wait = WAIT_SLEEP;
    c->gen++;
    plua_arm_deadline(c);
    timer_arm(c->timer, (uint64_t)(s * 1000.0 + 0.5));
    return lua_yield(L, 0);
}

static void plua_dns_done(struct dns_query *q, enum dns_status status, const struct dns_result *res,
                          const char *detail, void *arg);

static int
plua_dns_start(lua_State *L, bool mx)
{
    const char *name = luaL_checkstring(L, 1);
    struct plua_call *c = plua_async_call(L, mx ? "petrel.dns.mx" : "petrel.dns.a");
    if (c->p->dns == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "tempfail");
        return 2;
    }
    c->wait = WAIT_DNS;
    c->gen++;
    plua_arm_deadline(c);
    c->q_mx = mx;
    c->q = mx ? dns_resolve_mx(c->p->dns, name, plua_dns_done, c)
              : dns_resolve_host(c->p->dns, name, plua_dns_done, c);
    return lua_yield(L, 0);
}

static int
plua_dns_mx(lua_State *L)
{
    return plua_dns_start(L, true);
}

static int
plua_dns_a(lua_State *L)
{
    return plua_dns_start(L, false);
}

static const luaL_Reg plua_petrel_funcs[] = {
    {"on", plua_petrel_on},
    {"accept", plua_petrel_accept},
    {"reject", plua_petrel_reject},
    {"tempfail", plua_petrel_tempfail},
    {"log", plua_petrel_log},
    {"sleep", plua_petrel_sleep},
    {NULL, NULL},
};

static const luaL_Reg plua_dns_funcs[] = {
    {"mx", plua_dns_mx},
    {"a", plua_dns_a},
    {NULL, NULL},
};

/* ---- states ---- */

static int
plua_msghandler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL)
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void
plua_state_unref(struct plua_state *st)
{
    if (st == NULL || --st->refs > 0)
        return;
    lua_close(st->L);
    free(st);
}

/* The directory of path, with a trailing '/', or "./". */
static char *
plua_dirname(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (slash == NULL)
        return xstrdup("./");
    return xstrndup(path, (size_t)(slash - path) + 1);
}

static struct plua_state *
plua_state_new(struct plua *p, const char *script, char **err)
{
    struct plua_state *st = xcalloc(1, sizeof(*st));
    st->p = p;
    st->refs = 1;
    st->L = luaL_newstate();
    if (st->L == NULL)
        PANIC("luaL_newstate: out of memory");
    lua_State *L = st->L;
    *(struct plua_call **)lua_getextraspace(L) = NULL;
    luaL_openlibs(L);
    lua_pushlightuserdata(L, st);
    lua_setfield(L, LUA_REGISTRYINDEX, PLUA_STATE_KEY);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, PLUA_HOOKS_KEY);
    luaL_newmetatable(L, PLUA_VERDICT_MT);
    lua_pop(L, 1);
    plua_views_init(L);
    luaL_newlib(L, plua_petrel_funcs);
    luaL_newlib(L, plua_dns_funcs);
    lua_setfield(L, -2, "dns");
    lua_setglobal(L, "petrel");
    if (script == NULL)
        return st;

    /* require: modules beside the script first. */
    char *dir = plua_dirname(script);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    lua_pushfstring(L, "%s?.lua;%s?/init.lua;%s", dir, dir, lua_tostring(L, -1));
    lua_setfield(L, -3, "path");
    lua_pop(L, 2);
    free(dir);

    lua_pushcfunction(L, plua_msghandler);
    int rc = luaL_loadfilex(L, script, "t");
    if (rc == LUA_OK)
        rc = lua_pcall(L, 0, 0, 1);
    if (rc != LUA_OK) {
        /* "script:line: message" (the first line of the traceback). */
        const char *m = lua_tostring(L, -1);
        if (m == NULL)
            m = "error loading the script";
        *err = xstrndup(m, strcspn(m, "\n"));
        lua_close(L);
        free(st);
        return NULL;
    }
    lua_settop(L, 0);
    return st;
}

static void
plua_apply_cfg(struct plua *p, const struct petrel_config *cfg)
{
    p->on_error = cfg->lua.on_error;
    p->timeout_ms = cfg->lua.timeout_ms > 0 ? cfg->lua.timeout_ms : 1000;
}

struct plua *
plua_open(struct uv_loop_s *loop, const struct petrel_config *cfg, struct dns *dns, char **err)
{
    struct plua *p = xcalloc(1, sizeof(*p));
    p->loop = loop;
    p->dns = dns;
    plua_apply_cfg(p, cfg);
    p->cur = plua_state_new(p, cfg->lua.script, err);
    if (p->cur == NULL) {
        free(p);
        return NULL;
    }
    return p;
}

int
plua_reload(struct plua *p, const struct petrel_config *cfg, char **err)
{
    struct plua_state *st = plua_state_new(p, cfg->lua.script, err);
    if (st == NULL) {
        log_msg(LOG_ERR, "NOQUEUE", "lua: reload failed, keeping the old script: %s", *err);
        return -1;
    }
    plua_state_unref(p->cur);
    p->cur = st;
    plua_apply_cfg(p, cfg);
    return 0;
}

bool
plua_hook_known(const char *name)
{
    for (size_t i = 0; plua_hooks[i] != NULL; i++)
        if (strcmp(plua_hooks[i], name) == 0)
            return true;
    return false;
}

bool
plua_has_hook(struct plua *p, const char *name)
{
    lua_State *L = p->cur->L;
    lua_getfield(L, LUA_REGISTRYINDEX, PLUA_HOOKS_KEY);
    bool has = lua_getfield(L, -1, name) == LUA_TFUNCTION;
    lua_pop(L, 2);
    return has;
}

size_t
plua_pending(const struct plua *p)
{
    return p->ncalls;
}

/* ---- calls ---- */

static void
plua_result_reset(struct plua_result *r)
{
    plua_result_drop_answers(r);
    free(r->error);
    verdict_clear(&r->verdict);
    memset(r, 0, sizeof(*r));
    verdict_init(&r->verdict);
}

/* Marks every view expired, drops the coroutine and the state reference,
 * stops the timers and the lookup, unlinks and frees c. */
static void
plua_call_free(struct plua_call *c)
{
    struct plua *p = c->p;
    if (c->q != NULL)
        dns_cancel(c->q);
    timer_free(c->timer);
    timer_free(c->deadline);
    lua_State *L = c->st->L;
    if (c->views_ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, c->views_ref);
        lua_Integer n = luaL_len(L, -1);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            struct plua_view *v = lua_touserdata(L, -1);
            if (v != NULL) {
                v->expired = true;
                v->call = NULL;
            }
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
        luaL_unref(L, LUA_REGISTRYINDEX, c->views_ref);
    }
    if (c->co_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, c->co_ref);
    plua_state_unref(c->st);
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        p->calls = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    p->ncalls--;
    plua_result_reset(&c->res);
    verdict_clear(&c->res.verdict); /* reset re-initialised it: nothing owned */
    free(c);
}

static void
plua_finish(struct plua_call *c)
{
    c->wait = WAIT_NONE;
    /* The views expire in plua_call_free(), after the callback; the
     * coroutine is no longer running, so no Lua code can touch them. */
    c->in_cb = true;
    c->cb(c, &c->res, c->arg);
    plua_call_free(c);
}

/* Logs msg (possibly a multi-line traceback) on one line and sets the
 * on_error outcome. */
static void
plua_fail(struct plua_call *c, const char *msg)
{
    struct plua_result *r = &c->res;
    const char *nl = strchr(msg, '\n');
    free(r->error);
    r->error = nl != NULL ? xstrndup(msg, (size_t)(nl - msg)) : xstrdup(msg);
    char *flat = xstrdup(msg);
    for (char *s = flat; *s != '\0'; s++)
        if (*s == '\n' || *s == '\t')
            *s = ' ';
    const char *act = verdict_action_name(c->p->on_error);
    log_msg(LOG_WARNING, c->key, "lua: hook %s failed (on_error=%s): %s", c->hook, act, flat);
    free(flat);
    /* Nothing the hook produced before failing is used. */
    plua_result_drop_answers(r);
    r->status = PLUA_ERROR;
    verdict_set_on_error(&r->verdict, c->p->on_error);
}

static bool
plua_hook_is(const struct plua_call *c, const char *const *names)
{
    for (; *names != NULL; names++)
        if (strcmp(c->hook, *names) == 0)
            return true;
    return false;
}

/* Reads a string field of the table at idx into *out (owned); false if
 * present but not a string. */
static bool
plua_field_str(lua_State *L, int idx, const char *k, char **out)
{
    int t = lua_getfield(L, idx, k);
    bool ok = true;
    if (t == LUA_TSTRING)
        *out = xstrdup(lua_tostring(L, -1));
    else if (t != LUA_TNIL)
        ok = false;
    lua_pop(L, 1);
    return ok;
}

/* Whether the value at idx is a table made by petrel.accept/reject/tempfail. */
static bool
plua_is_verdict(lua_State *L, int idx)
{
    if (!lua_istable(L, idx) || !lua_getmetatable(L, idx))
        return false;
    luaL_getmetatable(L, PLUA_VERDICT_MT);
    bool is = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return is;
}

/* Interprets the hook's return values (nres on co's top). Returns NULL or
 * why they are invalid. */
static const char *
plua_take_results(struct plua_call *c, lua_State *co, int nres)
{
    static const char *const verdict_hooks[] = {"connect", "helo", "mail_from",
                                                "rcpt_to", "data", NULL};
    static const char *const bool_hooks[] = {"auth", "xbind", NULL};
    struct plua_result *r = &c->res;
    int idx = lua_gettop(co) - nres + 1;
    bool none = nres == 0 || lua_isnil(co, idx);
    r->status = PLUA_OK;

    if (plua_hook_is(c, verdict_hooks)) {
        if (none)
            return NULL;
        if (!plua_is_verdict(co, idx))
            return "expected a verdict (petrel.accept/reject/tempfail) or nothing";
        char *action = NULL, *esc = NULL, *text = NULL;
        plua_field_str(co, idx, "action", &action);
        plua_field_str(co, idx, "enhanced", &esc);
        plua_field_str(co, idx, "text", &text);
        lua_getfield(co, idx, "code");
        int code = (int)lua_tointeger(co, -1);
        lua_pop(co, 1);
        const char *why = NULL;
        if (action != NULL && strcmp(action, "accept") == 0)
            verdict_set(&r->verdict, VERDICT_ACCEPT, NULL);
        else if (action != NULL && esc != NULL && text != NULL)
            verdict_setf(&r->verdict,
                         strcmp(action, "reject") == 0 ? VERDICT_REJECT : VERDICT_TEMPFAIL, code,
                         esc, "%s", text);
        else
            why = "malformed verdict";
        free(action);
        free(esc);
        free(text);
        if (why == NULL)
            why = verdict_check(&r->verdict);
        return why;
    }
    if (plua_hook_is(c, bool_hooks)) {
        if (!none && !lua_isboolean(co, idx))
            return "expected true or false";
        r->allow = lua_toboolean(co, idx);
        r->answered = !none;
        return NULL;
    }
    if (strcmp(c->hook, "route") == 0) {
        if (none)
            return NULL;
        if (lua_type(co, idx) != LUA_TSTRING)
            return "expected a route string";
        r->route = xstrdup(lua_tostring(co, idx));
        return NULL;
    }
    if (strcmp(c->hook, "select_source") == 0) {
        if (none)
            return NULL;
        if (!lua_istable(co, idx))
            return "expected {ip = ..., hostname = ...}";
        if (!plua_field_str(co, idx, "ip", &r->source_ip) ||
            !plua_field_str(co, idx, "hostname", &r->source_hostname) || r->source_ip == NULL)
            return "expected {ip = ..., hostname = ...} with string fields";
        struct in6_addr a6;
        if (inet_pton(AF_INET, r->source_ip, &a6) != 1 &&
            inet_pton(AF_INET6, r->source_ip, &a6) != 1)
            return "select_source: ip is not an IP address";
        return NULL;
    }
    if (strcmp(c->hook, "retry") == 0) {
        if (none)
            return NULL;
        if (lua_type(co, idx) == LUA_TSTRING && strcmp(lua_tostring(co, idx), "bounce") == 0) {
            r->retry_set = true;
            r->bounce = true;
            return NULL;
        }
        if (lua_type(co, idx) != LUA_TNUMBER)
            return "expected seconds or \"bounce\"";
        lua_Number s = lua_tonumber(co, idx);
        if (!(s >= 0) || s > 365.0 * 86400)
            return "retry delay out of range";
        r->retry_set = true;
        r->retry_seconds = (uint64_t)s;
        return NULL;
    }
    if (strcmp(c->hook, "bounce") == 0) {
        if (none)
            return NULL;
        if (!lua_istable(co, idx) || !plua_field_str(co, idx, "subject", &r->subject) ||
            !plua_field_str(co, idx, "text", &r->text))
            return "expected {subject = ..., text = ...}";
        if (r->subject != NULL && strpbrk(r->subject, "\r\n") != NULL)
            return "bounce subject holds CR or LF";
        return NULL;
    }
    return NULL; /* event: ignored */
}

static void
plua_count_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    struct plua_call *c = plua_call_of(L);
    if (c == NULL)
        return;
    c->insns += PLUA_COUNT_STEP;
    int64_t ran = c->run_ms + (now_ms() - c->run_start);
    if (c->insns > c->p->timeout_ms * PLUA_INSNS_PER_MS || ran > (int64_t)c->p->timeout_ms) {
        /* From now on every instruction raises, so a pcall in a loop cannot
         * swallow the error and keep running. */
        lua_sethook(L, plua_count_hook, LUA_MASKCOUNT, 1);
        luaL_error(L, "hook exceeded lua.timeout (%d ms)", (int)c->p->timeout_ms);
    }
}

/* Runs the coroutine with the nargs values on its stack; finishes the call
 * unless it yielded in a helper. */
static void
plua_resume(struct plua_call *c, int nargs)
{
    lua_State *co = c->co;
    int nres = 0;
    c->wait = WAIT_NONE;
    c->run_start = now_ms();
    int rc = lua_resume(co, c->st->L, nargs, &nres);
    c->run_ms += now_ms() - c->run_start;
    if (rc == LUA_YIELD) {
        if (c->wait != WAIT_NONE)
            return; /* a helper will resume us */
        lua_pop(co, nres);
        plua_fail(c, "hook yielded outside a petrel helper (coroutine.yield in a hook)");
    } else if (rc == LUA_OK) {
        const char *why = plua_take_results(c, co, nres);
        lua_pop(co, nres);
        if (why != NULL) {
            lua_Debug ar;
            char msg[512];
            lua_State *L = c->st->L;
            /* Name the hook's definition: script:line. */
            lua_getfield(L, LUA_REGISTRYINDEX, PLUA_HOOKS_KEY);
            lua_getfield(L, -1, c->hook);
            if (lua_isfunction(L, -1) && lua_getinfo(L, ">S", &ar))
                snprintf(msg, sizeof(msg), "%s:%d: hook %s returned a bad value: %s", ar.short_src,
                         ar.linedefined, c->hook, why);
            else
                snprintf(msg, sizeof(msg), "hook %s returned a bad value: %s", c->hook, why);
            lua_settop(L, 0);
            plua_fail(c, msg);
        }
    } else {
        const char *m = lua_tostring(co, -1);
        lua_State *L = c->st->L;
        luaL_traceback(L, co, m != NULL ? m : "(error object is not a string)", 0);
        plua_fail(c, lua_tostring(L, -1));
        lua_settop(L, 0);
    }
    plua_finish(c);
}

static void
plua_timer_fired(struct timer *t, void *arg)
{
    struct plua_call *c = arg;
    (void)t;
    if (c->wait == WAIT_START) {
        if (c->co == NULL) {
            c->res.status = PLUA_NO_HOOK;
            plua_finish(c);
            return;
        }
        int nargs = (int)lua_tointeger(c->co, -1);
        lua_pop(c->co, 1);
        plua_resume(c, nargs);
    } else if (c->wait == WAIT_SLEEP) {
        plua_resume(c, 0);
    }
}

static void
plua_deadline_fired(struct timer *t, void *arg)
{
    struct plua_call *c = arg;
    (void)t;
    if (c->wait != WAIT_SLEEP && c->wait != WAIT_DNS)
        return;
    if (c->q != NULL) {
        dns_cancel(c->q);
        c->q = NULL;
    }
    char msg[128];
    snprintf(msg, sizeof(msg), "hook %s exceeded its deadline (%llu ms) while waiting", c->hook,
             (unsigned long long)(c->p->timeout_ms * PLUA_DEADLINE_FACTOR));
    plua_fail(c, msg);
    plua_finish(c);
}

static void
plua_dns_done(struct dns_query *q, enum dns_status status, const struct dns_result *res,
              const char *detail, void *arg)
{
    struct plua_call *c = arg;
    if (c->wait != WAIT_DNS || c->q != q)
        return; /* stale (cannot happen: cancelled calls cancel their query) */
    c->q = NULL;
    lua_State *co = c->co;
    if (status != DNS_OK || res == NULL) {
        lua_pushnil(co);
        lua_pushstring(co, dns_status_name(status));
        lua_pushstring(co, detail != NULL ? detail : dns_status_name(status));
        plua_resume(c, 3);
        return;
    }
    char ip[INET6_ADDRSTRLEN];
    if (c->q_mx) {
        /* { {name=, pref=, addrs={...}}, ... } */
        lua_createtable(co, (int)res->nhosts, 0);
        for (size_t i = 0; i < res->nhosts; i++) {
            const struct dns_host *h = &res->hosts[i];
            lua_createtable(co, 0, 3);
            lua_pushstring(co, h->name);
            lua_setfield(co, -2, "name");
            lua_pushinteger(co, h->pref);
            lua_setfield(co, -2, "pref");
            lua_createtable(co, (int)h->naddrs, 0);
            for (size_t j = 0; j < h->naddrs; j++) {
                const struct sockaddr_storage *ss = &h->addrs[j].ss;
                const void *a = ss->ss_family == AF_INET6
                                    ? (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr
                                    : (const void *)&((const struct sockaddr_in *)ss)->sin_addr;
                if (inet_ntop(ss->ss_family, a, ip, sizeof(ip)) == NULL)
                    continue;
                lua_pushstring(co, ip);
                lua_rawseti(co, -2, (lua_Integer)luaL_len(co, -2) + 1);
            }
            lua_setfield(co, -2, "addrs");
            lua_rawseti(co, -2, (lua_Integer)i + 1);
        }
    } else {
        /* { "ip", ... } */
        lua_newtable(co);
        for (size_t i = 0; i < res->nhosts; i++)
            for (size_t j = 0; j < res->hosts[i].naddrs; j++) {
                const struct sockaddr_storage *ss = &res->hosts[i].addrs[j].ss;
                const void *a = ss->ss_family == AF_INET6
                                    ? (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr
                                    : (const void *)&((const struct sockaddr_in *)ss)->sin_addr;
                if (inet_ntop(ss->ss_family, a, ip, sizeof(ip)) == NULL)
                    continue;
                lua_pushstring(co, ip);
                lua_rawseti(co, -2, (lua_Integer)luaL_len(co, -2) + 1);
            }
    }
    plua_resume(c, 1);
}

struct plua_call *
plua_call(struct plua *p, const char *name, const struct plua_args *args, plua_cb *cb, void *arg)
{
    static const struct plua_args none;
    struct plua_call *c = xcalloc(1, sizeof(*c));
    c->p = p;
    c->st = p->cur;
    c->st->refs++;
    c->cb = cb;
    c->arg = arg;
    c->co_ref = LUA_NOREF;
    verdict_init(&c->res.verdict);
    if (!str_copy(c->hook, sizeof(c->hook), name))
        c->hook[0] = '\0';
    if (args == NULL)
        args = &none;
    if (args->queue_id == NULL || !str_copy(c->key, sizeof(c->key), args->queue_id))
        snprintf(c->key, sizeof(c->key), "NOQUEUE");
    c->next = p->calls;
    if (p->calls != NULL)
        p->calls->prev = c;
    p->calls = c;
    p->ncalls++;

    /* The coroutine and the views are built now, while args are valid (the
     * views copy the data); the coroutine waits with the function, its
     * arguments and their count on its stack until the timer starts it. */
    lua_State *L = c->st->L;
    lua_newtable(L);
    c->views_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    c->wait = WAIT_START;
    lua_getfield(L, LUA_REGISTRYINDEX, PLUA_HOOKS_KEY);
    bool has = lua_getfield(L, -1, c->hook) == LUA_TFUNCTION;
    if (has) {
        c->co = lua_newthread(L);
        c->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        *(struct plua_call **)lua_getextraspace(c->co) = c;
        lua_sethook(c->co, plua_count_hook, LUA_MASKCOUNT, PLUA_COUNT_STEP);
        lua_xmove(L, c->co, 1); /* the function */
        lua_pushinteger(c->co, plua_push_args(c, c->co, args));
    } else {
        lua_pop(L, 1);
    }
    lua_pop(L, 1);

    c->started_ms = now_ms();
    c->timer = timer_new(p->loop, plua_timer_fired, c);
    timer_arm(c->timer, 0);
    return c;
}

void
plua_cancel(struct plua_call *c)
{
    if (c == NULL || c->in_cb)
        return;
    plua_call_free(c);
}

void
plua_close(struct plua *p)
{
    if (p == NULL)
        return;
    while (p->calls != NULL)
        plua_call_free(p->calls);
    plua_state_unref(p->cur);
    free(p);
}
