"""The demo world: string-transformation tasks, their description sets, and the world built from them.

- `tasks`: each task's rule, and the task file the build writes;
- `sets`: the description sets, JSONL package data (`data/README.md` says what each is for);
- `world`: `build_demo` builds (once) a small Llama, one expert per task in a registry, and the
  icm and sg generators under `$LORAGEN_HOME/demo`.
`loragen eval demo` (`loragen.bench.demo_eval`) scores every method on the built world. Nothing is
imported here, so reading the sets does not load torch.
"""
