"""Tests of the assumption study (paper Sec. 5.1, Figs. 1-2)."""
