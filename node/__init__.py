"""Chapar node and hub: one program, two roles (``chapar node serve`` / ``chapar hub serve``)."""
