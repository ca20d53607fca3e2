"""Stages: each wires one algorithm of the math layer into the training loop and writes a run directory."""
