"""Recipes: short functions that wire data, models and the one training loop for a stage."""
