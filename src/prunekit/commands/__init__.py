"""The command line's commands, one module each; ``prunekit.cli`` builds the parser and dispatches."""
