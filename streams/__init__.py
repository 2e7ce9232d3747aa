"""The Faust apps: agents that drive the projections."""
