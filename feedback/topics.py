"""Topic names: the contract between the gateway, the ingestor and anything else on the bus."""

COMPLETIONS = "feedloop.completions"  # CompletionServed, keyed by prompt_key
FEEDBACK = "feedloop.feedback"  # FeedbackEvent, keyed by the prompt_key of the completion it is about
DEAD_LETTERS = "feedloop.dead-letters"  # events the ingestor could not store, with the reason in headers

ALL = (COMPLETIONS, FEEDBACK, DEAD_LETTERS)
