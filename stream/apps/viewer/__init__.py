"""The live browser viewer: follows Tiled and the stages' metrics."""
