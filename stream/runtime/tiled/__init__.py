"""Publishing to Tiled: client access, node writing, pending final results, the publisher."""
