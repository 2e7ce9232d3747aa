"""HTTP routes of the datasets context."""
