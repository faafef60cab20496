"""Content filtering off the critical path (DESIGN "Content filtering off the critical path").

`base` holds what every classifier shares (the verdict, the interface, the policy and its
configuration); `rules` is the built-in rule-based classifier (RE2: linear time on any input, no
backtracking on configured patterns); `remote` sends the input as an ordinary request to a
`classify` model on a worker. The race itself (classification started at dispatch, abort on a
violation that wins) lives with the queue node in `casola.queue.filtering`.
"""

from casola.filter.base import Classifier, FilterConfig, Policy, Verdict

__all__ = ["Classifier", "FilterConfig", "Policy", "Verdict"]
