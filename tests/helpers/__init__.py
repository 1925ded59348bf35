"""Shared test helpers: oracles computed from definitions, tiny networks, the experiment list, small runs."""
