"""The `mamtra` sub-commands, one module per stage, each a recipe: parse the options, call the library
function that does the work, print the result. Installed as `mamtra_cli.stages` and registered in
pyproject.toml under the entry-point group `mamtra.stages`."""
