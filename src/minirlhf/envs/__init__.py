"""Environments for multi-turn episodes: a scripted user that opens a conversation and answers each assistant
turn, and a reward per turn. base.py holds the protocol and the registry; each built-in is one file."""
