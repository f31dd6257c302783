"""Builders that ask an OpenAI-compatible chat model for text, side by side.

- :mod:`.context_library`: ``cores build-context``, the exemplar library (paper §3.2).
- :mod:`.reasonpart`: ``cores make-reasonpart``, the ReasonPart benchmark (paper appendix C).

Both use the same chat plumbing, so a deadline, a retry or a stop rule means the same thing in
each: the settings, the key and the client (:mod:`.chat_settings`), one request with its deadline
and retries and the JSON of its reply (:mod:`.chat_requests`), the concurrent request loop and the
run summary (:mod:`.chat_loop`), and the append-only output with torn-line repair
(:mod:`.append_only`).
"""
