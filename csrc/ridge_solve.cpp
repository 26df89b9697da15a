// fasterase::ridge_solve on CUDA tensors: X (R, d) float64 with X (lambda I + sum_i G_i) = B.
//
// One Gram update (lambda I plus the d x d Gram pieces shared by every projection), one Cholesky
// factorisation and one solve of all stacked right-hand-side rows. ATen routes the factorisation
// and the solve to cuSOLVER/cuBLAS. The schema and the fake implementation are defined in Python
// (kernels/ridge_solve.py), as is the plain-PyTorch reference that this kernel is tested against;
// this file registers the CUDA kernel only.

#include <ATen/core/Tensor.h>
#include <ATen/ops/cholesky_solve.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace fasterase {
namespace {

at::Tensor ridge_solve_cuda(const at::Tensor& rhs, at::TensorList grams, double lam) {
  TORCH_CHECK(rhs.dim() == 2, "fasterase::ridge_solve: rhs must be (rows, d), not of shape ", rhs.sizes());
  TORCH_CHECK(rhs.is_cuda(), "fasterase::ridge_solve: this kernel takes CUDA tensors, rhs is on ", rhs.device());
  TORCH_CHECK(at::isFloatingType(rhs.scalar_type()), "fasterase::ridge_solve: rhs must be floating point, not ", rhs.scalar_type());
  TORCH_CHECK(lam >= 0, "fasterase::ridge_solve: lambda must be at least 0, not ", lam);
  const int64_t d = rhs.size(1);
  const c10::DeviceGuard guard(rhs.device());

  // Gram update: the system lambda I + sum_i G_i, accumulated in float64.
  at::Tensor system = at::eye(d, rhs.options().dtype(at::kDouble));
  system.mul_(lam);
  for (size_t i = 0; i < grams.size(); ++i) {
    const at::Tensor& gram = grams[i];
    TORCH_CHECK(gram.dim() == 2 && gram.size(0) == d && gram.size(1) == d,
                "fasterase::ridge_solve: gram ", i, " has shape ", gram.sizes(), "; every Gram must be (d, d) with d = ", d,
                ", the columns of rhs");
    TORCH_CHECK(gram.device() == rhs.device(), "fasterase::ridge_solve: gram ", i, " is on ", gram.device(), ", rhs on ", rhs.device());
    system.add_(gram);
  }

  // Cholesky reads the lower triangle; info > 0 names the first leading minor that is not positive.
  auto [factor, info] = at::linalg_cholesky_ex(system, /*upper=*/false, /*check_errors=*/false);
  const int64_t minor = info.item<int64_t>();
  TORCH_CHECK(minor == 0, "the ridge system is not positive definite even in float64 (leading minor ", minor,
              "); raise lambda (now ", lam, ")");

  // X S = B with S symmetric is S X^T = B^T: every stacked row is one column of a single solve.
  // B^T of a row-major B is column-major, the layout the solver works in.
  return at::cholesky_solve(rhs.to(at::kDouble).t(), factor, /*upper=*/false).t().contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fasterase, CUDA, m) {
  m.impl("ridge_solve", &ridge_solve_cuda);
}

}  // namespace fasterase
