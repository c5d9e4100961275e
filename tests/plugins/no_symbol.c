/*
 * no_symbol — a shared object that is not a petrel plugin: it exports no
 * petrel_plugin_init.
 */
int no_symbol_answer(void);

int
no_symbol_answer(void)
{
    return 42;
}
