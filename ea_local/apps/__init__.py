"""The commands a person runs: chat, summarize, demo, info, the setup smoke check."""
