exec(open("research/round4/pilot.py").read().split("engine = B.load_engine()")[0].replace('GRID = {', 'GRID0 = {'))
GRID = {"prefill": [((L,), c) for L in (13, 14, 16, 17) for c in (0.75, 1.0, 1.25, 1.5)] + [((15,), c) for c in (1.25,)]}
NR_GRID = []
exec("engine = B.load_engine()" + open("research/round4/pilot.py").read().split("engine = B.load_engine()")[1].replace('for grid, nr in ((GRID, 0), ({"addnr": NR_GRID}, 3)):', 'for grid, nr in ((GRID, 0),):'))
