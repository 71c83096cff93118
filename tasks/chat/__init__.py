"""Talking to models from the terminal: `tinyllama generate` (a completion) and `tinyllama chat`
(a conversation with a chat model)."""
