"""Benchmarks, apart from the library they measure: each behind a `loragen bench` or `loragen eval` command.

- `decode`: fused decoding against a Text-to-LoRA-style loop (`loragen bench decode`);
- `loadtest`: closed-loop load on a running service (`loragen bench serve`);
- `demo_eval`: every method's exact match on the demo world (`loragen eval demo`).
"""
