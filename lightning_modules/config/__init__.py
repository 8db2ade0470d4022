"""The config's one home for what a user can get wrong: the errors (``errors``), the table of value rules
(``schema``) and the checks of a composed config before anything heavy is imported (``check``). No torch."""
