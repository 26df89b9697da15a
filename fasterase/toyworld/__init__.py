"""The built-in world: procedural images and captions, the recipe that trains a small model of
Stable Diffusion's architecture and a classifier on them, and their packaged weights."""
