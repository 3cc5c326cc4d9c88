"""Training and evaluation of the small embedded model (issue 5); never imported by the serving path."""
