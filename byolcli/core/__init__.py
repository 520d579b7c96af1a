"""The core: what every command stands on. Scanning a folder (scan), files, run folders and locks
(files, locks, names, signals), images and pixels (images, pixels, small_maps), the hardware and how
this machine loads and computes (hardware, loading), the networks and their weights (backbones,
encoder, start, model_choice), BYOL's recipe and the two views it makes of an image (recipe, views),
embedding a folder (inference, embed, export), a labels file (labels), pages of image tiles (gallery)
and the console (terminal: the shared Reporter; each wing formats its own tables).

The core imports nothing from the wings: a module that would is a wing's."""
