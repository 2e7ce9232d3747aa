"""HTTP routes of the incidents context."""
