from optqa.cli import entry

entry()
