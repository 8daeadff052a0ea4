"""Load and soak measurements for Chapar; they drive real processes through the public SDK."""
