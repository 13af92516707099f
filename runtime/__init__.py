"""meshplan's runtime: apply a Plan to a model with torch.distributed and train it, reporting measured beside
predicted step time and memory. It never re-plans: it does what the plan says or refuses with a clear error."""
