"""Models: the frozen CLIP backbone, the text encoder over prompt embeddings, the prompt learner
and the Lightning modules of each method."""
