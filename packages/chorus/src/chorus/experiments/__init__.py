"""Studies that back design choices with measurements on the built-in model (each runnable with `python -m`)."""
