"""The built-in procedural video world: scenes, prompts, the analyzer that judges clips, and model training."""
