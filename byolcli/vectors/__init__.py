"""The vectors wing: questions asked of a folder's vectors. Reading them from the embed cache or a
.npy (store), nearest neighbours in blocks (search), and the four commands: similar, duplicates (with
the pixel check that confirms them), groups (clustering) and select (selection), run from commands.

It imports the core only. It offers the evaluation wing store and duplicates."""
