"""One module per command-line mode: ``run(cfg, store)`` tells its story, ``main`` opens the run for it."""
