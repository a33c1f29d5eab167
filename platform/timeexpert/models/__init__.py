"""The TimeExpert model and its parts: MoE layer, expert parallelism, vision, temporal tokens."""
