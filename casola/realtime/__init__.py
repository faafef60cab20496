"""Realtime voice sessions (DESIGN "Realtime voice sessions", docs/realtime.md): one long-lived
stream per conversation, served by the workflow engine in the queue node's process. Audio goes to a
`listen` worker on one stream; each end of speech runs the workflow's turn with the conversation;
its audio streams back; user speech while the agent answers (barge-in) cancels the turn.

Nothing is imported here: the ingress takes the framing constants (casola.realtime.framing) without
the engine behind them.
"""
