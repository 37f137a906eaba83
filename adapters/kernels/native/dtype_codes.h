// Dtype codes passed from the C++ nodes (layers.cpp) to the kernels, which include no ATen headers.
#pragma once

enum HypDtype : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };
