"""The TimeExpert model and its parts: its config, MoE layer, expert parallelism, vision, temporal
tokens."""
