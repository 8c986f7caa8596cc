// deprune_window.cuh: the conv window every kernel in cuda/ is specialised for, as compile-time constants:
//   DEPRUNE_KH, DEPRUNE_KW  window; DEPRUNE_SH, DEPRUNE_SW  stride; DEPRUNE_DH, DEPRUNE_DW  dilation.
// The launchers prepend the real values (deprune_plugin/kernels/sources.py); these defaults (a 3x3 window,
// stride and dilation 1) only let nvcc compile a .cu file alone.
#pragma once

#ifndef DEPRUNE_KH
#define DEPRUNE_KH 3
#endif
#ifndef DEPRUNE_KW
#define DEPRUNE_KW 3
#endif
#ifndef DEPRUNE_SH
#define DEPRUNE_SH 1
#endif
#ifndef DEPRUNE_SW
#define DEPRUNE_SW 1
#endif
#ifndef DEPRUNE_DH
#define DEPRUNE_DH 1
#endif
#ifndef DEPRUNE_DW
#define DEPRUNE_DW 1
#endif
