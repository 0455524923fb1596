"""placeholder"""
def add_arguments(name, parser):
    pass
def run(args):
    return 0
