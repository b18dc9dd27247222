"""Applications: the launcher, the command line, demo, replay, viewer and Bluesky bridges."""
