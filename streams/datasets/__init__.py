"""Stream-processing jobs of the datasets context."""
