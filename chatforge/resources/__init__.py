"""Data files that ship with chatforge (the demo's Lumo FAQ and the script that writes it)."""
