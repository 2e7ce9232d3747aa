"""Stream-processing jobs of the incidents context."""
