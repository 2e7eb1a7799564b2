"""Acting on a decision: the journal and the step runner."""
