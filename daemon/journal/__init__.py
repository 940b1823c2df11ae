"""The request journal: records every accepted request until its final is delivered, so a
restart after a crash still gives each exactly one final (journal.py), its file format
(file.py) and what a restarted daemon owes (recovery.py)."""
