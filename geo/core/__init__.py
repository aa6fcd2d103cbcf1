"""Pure helpers: geodesy, S2 cells, splits, priors, the kNN vote, the typed Answer, runtime."""
