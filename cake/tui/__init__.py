"""`cake chat`: the terminal chat app (textual)."""
