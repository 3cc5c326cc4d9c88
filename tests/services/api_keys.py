"""API keys the services tests configure (plain test values; the server keeps only their hashes)."""

KEY_A = "key-a-0123456789"
KEY_B = "key-b-0123456789"
