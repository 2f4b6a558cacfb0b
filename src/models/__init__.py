"""The frozen backbone: CLIP and its weights, the text encoder over prompt embeddings, the prompt
learner, deep prompts, and the architectures and weights the project ships (conf/model/ mirrors
it). The methods built on it are in src/methods/."""
