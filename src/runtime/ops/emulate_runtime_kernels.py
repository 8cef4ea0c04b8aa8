# emulate_runtime_kernels.py — a numpy emulation of the index arithmetic of kernels/runtime_*.cu (the
# runtime's CUDA device, src/runtime/ops/cuda.rs), block by block and thread by thread where it matters,
# checked against direct formulas in f64 (no GPU needed). Covers the linear GEMM tiles (all three
# operand layouts, edges off the 64 × 64 × 16 tiles), the three attention kernels (warp ↦ row maps,
# lanes ↦ dimensions, causal and window ranges, GQA head mapping, lse layout), rotary indexing and the
# RMSNorm weight-gradient chunks. Run: python3 src/runtime/ops/emulate_runtime_kernels.py; prints ALL OK.
import numpy as np, math
rng = np.random.default_rng(0)

# ---- runtime_linear.cu: lin_gemm<A_R, B_R, ACC> ------------------------------------------------------
BM, BN, BK, THREADS = 64, 64, 16, 256

def lin_stage(S, P, ld, rows, R, i0, r0, R_CONTIG, t):
    """lin_stage<R_CONTIG>: S[rr, ii] = P(i0 + ii, r0 + rr), zero outside (BM == BN)."""
    for q in range(BM * BK // THREADS):
        e = t + q * THREADS
        if R_CONTIG: rr, ii = e % BK, e // BK
        else: ii, rr = e % BM, e // BM
        gi, gr = i0 + ii, r0 + rr
        ok = (gi < rows) & (gr < R)
        idx = gi * ld + gr if R_CONTIG else gr * ld + gi
        S[rr, ii] = np.where(ok, P[np.where(ok, idx, 0)], 0.0)

def lin_gemm(A, lda, B, ldb, C, ldc, bias, M, N, R, A_R, B_R, ACC, grid):
    t = np.arange(THREADS); tx = t % 16; ty = t // 16
    for by in range(grid[1]):
        for bx in range(grid[0]):
            i0, j0 = by * BM, bx * BN
            acc = np.zeros((THREADS, 4, 4))
            for r0 in range(0, R, BK):
                As = np.full((BK, BM + 1), np.nan); Bs = np.full((BK, BN + 1), np.nan)
                lin_stage(As, A, lda, M, R, i0, r0, A_R, t)
                lin_stage(Bs, B, ldb, N, R, j0, r0, B_R, t)
                assert not np.isnan(As[:, :BM]).any() and not np.isnan(Bs[:, :BN]).any(), "tile not filled"
                for r in range(BK):
                    a = np.stack([As[r, ty + 16 * x] for x in range(4)], 1)
                    b = np.stack([Bs[r, tx + 16 * y] for y in range(4)], 1)
                    acc += a[:, :, None] * b[:, None, :]
            for x in range(4):
                gi = i0 + ty + 16 * x
                for y in range(4):
                    gj = j0 + tx + 16 * y
                    ok = (gi < M) & (gj < N)
                    idx = (gi * ldc + gj)[ok]
                    v = acc[ok, x, y]
                    if ACC: C[idx] += v
                    else: C[idx] = v + (bias[gj[ok]] if bias is not None else 0.0)

def check_linear():
    for n, k, m in [(67, 93, 130), (1, 16, 64), (130, 40, 45), (5, 3, 70)]:
        x = rng.standard_normal(n * k); w = rng.standard_normal(m * k); b = rng.standard_normal(m)
        dy = rng.standard_normal(n * m)
        X, W, DY = x.reshape(n, k), w.reshape(m, k), dy.reshape(n, m)
        y = np.full(n * m, np.nan)
        lin_gemm(x, k, w, k, y, m, b, n, m, k, True, True, False, (-(-m // 64), -(-n // 64)))
        assert np.allclose(y.reshape(n, m), X @ W.T + b), "linear_forward"
        dx0 = rng.standard_normal(n * k); dx = dx0.copy()
        lin_gemm(dy, m, w, k, dx, k, None, n, k, m, True, False, True, (-(-k // 64), -(-n // 64)))
        assert np.allclose(dx.reshape(n, k), dx0.reshape(n, k) + DY @ W), "linear_backward_input"
        dw0 = rng.standard_normal(m * k); dw = dw0.copy()
        lin_gemm(dy, m, x, k, dw, k, None, m, k, n, False, False, True, (-(-k // 64), -(-m // 64)))
        assert np.allclose(dw.reshape(m, k), dw0.reshape(m, k) + DY.T @ X), "linear_backward_weight"
    print("linear tiles ok")

# ---- runtime_linear.cu: lin_mma<A_R, B_R, ACC> (tensor cores, bf16 operands) ---------------------------
MM, MK, MPAD = 128, 32, 8

def bf16(v):
    """f32 -> bf16 -> f32, round to nearest even (cvt.rn.bf16x2.f32), as float64."""
    b = np.asarray(v, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)

def lin_pairs(P, ld, rows, R, i0, r0, R_CONTIG, S):
    """lin_load_pairs + lin_store_pairs for all 256 threads: S[ii, rr..rr+1] of the pairs they own."""
    tid = np.arange(256)
    for q in range(8):
        p = tid + 256 * q
        ii = (p >> 4) if R_CONTIG else (p & 127)
        rr = 2 * (p & 15) if R_CONTIG else 2 * (p >> 7)
        gi, gr = i0 + ii, r0 + rr
        for o in (0, 1):
            ok = (gi < rows) & (gr + o < R)
            idx = gi * ld + gr + o if R_CONTIG else (gr + o) * ld + gi
            S[ii, rr + o] = np.where(ok, bf16(P[np.where(ok, idx, 0)]), 0.0)

def a_from_regs(regs, g, t):
    """The 16 x 16 A tile the hardware multiplies from registers regs[reg][h] (per lane), PTX m16n8k16:
    element a_j, j = 2 reg + h, sits at row g + 8 (j in 2,3,6,7), column 2t + (j & 1) + 8 (j >= 4)."""
    A = np.full((16, 16), np.nan)
    for reg in range(4):
        for h in (0, 1):
            j = 2 * reg + h
            A[g + 8 * (j in (2, 3, 6, 7)), 2 * t + (j & 1) + 8 * (j >= 4)] = regs[reg][h]
    return A

def frag_a(M, g, t, r0, c0):
    """The kernels' A fragment loads (mma_warp_step, the attention's Q): register reg holds
    M[r0 + g + dr][c0 + 2t + dc + (0, 1)]."""
    regs = [(0, 0), (8, 0), (0, 8), (8, 8)]  # the kernel's (row, col) offsets of registers 0..3
    return a_from_regs([[M[r0 + g + dr, c0 + 2 * t + dc + h] for h in (0, 1)] for dr, dc in regs], g, t)

def frag_b(Sm, g, t, n0, k0):
    """B fragments b0 = Sm[n0 + g][k0 + 2t..], b1 = Sm[n0 + g][k0 + 2t + 8..] rebuilt as the 16 x 8 tile."""
    B = np.full((16, 8), np.nan)
    for reg, dk in enumerate([0, 8]):
        for h in (0, 1):
            j = 2 * reg + h
            B[2 * t + (j & 1) + 8 * (j >= 2), g] = Sm[n0 + g, k0 + 2 * t + dk + h]
    return B

def c_frag(D, g, t):
    """The m16n8 accumulator layout: lane (g, t) holds D[g + 8 (h >> 1)][2t + (h & 1)] as c_h; [lane, h]."""
    return np.stack([D[g + 8 * (h >> 1), 2 * t + (h & 1)] for h in range(4)], 1)

def mma_warp_step(As, Bs, acc, wm, wn):
    """mma.cuh mma_warp_step for one warp: fragments gathered per lane by the PTX m16n8k16 layouts,
    the A (16x16) and B (16x8) they hold rebuilt and multiplied; acc[mt, nt, lane, h]."""
    lane = np.arange(32); g = lane >> 2; t = lane & 3
    for ks in (0, 16):
        for mt in range(2):
            A = frag_a(As, g, t, wm * 32 + mt * 16, ks)
            assert not np.isnan(A).any()
            for nt in range(8):
                B = frag_b(Bs, g, t, wn * 64 + nt * 8, ks)
                assert not np.isnan(B).any()
                acc[mt, nt] += c_frag(A @ B, g, t)

def lin_mma(A, lda, B, ldb, C, ldc, bias, M, N, R, A_R, B_R, ACC, grid):
    lane = np.arange(32); g = lane >> 2; t = lane & 3
    for by in range(grid[1]):
        for bx in range(grid[0]):
            i0, j0 = by * MM, bx * MM
            acc = np.zeros((8, 2, 8, 32, 4))
            for r0 in range(0, R, MK):
                As = np.full((MM, MK + MPAD), np.nan); Bs = np.full((MM, MK + MPAD), np.nan)
                lin_pairs(A, lda, M, R, i0, r0, A_R, As)
                lin_pairs(B, ldb, N, R, j0, r0, B_R, Bs)
                for w in range(8):
                    mma_warp_step(As, Bs, acc[w], w & 3, w >> 2)
            for w in range(8):
                wm, wn = w & 3, w >> 2
                for mt in range(2):
                    for nt in range(8):
                        for h in range(4):
                            gi = i0 + wm * 32 + mt * 16 + g + (h >> 1) * 8
                            gj = j0 + wn * 64 + nt * 8 + 2 * t + (h & 1)
                            ok = (gi < M) & (gj < N)
                            idx = (gi * ldc + gj)[ok]
                            v = acc[w, mt, nt, ok, h]
                            if ACC: C[idx] += v
                            else: C[idx] = v + (bias[gj[ok]] if bias is not None else 0.0)

def check_linear_mma():
    # Exact up to summation order against f64 products of the bf16-rounded operands.
    for n, k, m in [(130, 45, 140), (3, 33, 9), (129, 64, 257)]:
        x = rng.standard_normal(n * k).astype(np.float32); w = rng.standard_normal(m * k).astype(np.float32)
        b = rng.standard_normal(m); dy = rng.standard_normal(n * m).astype(np.float32)
        X, W, DY = bf16(x).reshape(n, k), bf16(w).reshape(m, k), bf16(dy).reshape(n, m)
        y = np.full(n * m, np.nan)
        lin_mma(x, k, w, k, y, m, b, n, m, k, True, True, False, (-(-m // MM), -(-n // MM)))
        assert np.allclose(y.reshape(n, m), X @ W.T + b, rtol=0, atol=1e-9), "linear_forward_bf16"
        dx0 = rng.standard_normal(n * k); dx = dx0.copy()
        lin_mma(dy, m, w, k, dx, k, None, n, k, m, True, False, True, (-(-k // MM), -(-n // MM)))
        assert np.allclose(dx.reshape(n, k), dx0.reshape(n, k) + DY @ W, rtol=0, atol=1e-9), "backward_input_bf16"
        dw0 = rng.standard_normal(m * k); dw = dw0.copy()
        lin_mma(dy, m, x, k, dw, k, None, m, k, n, False, False, True, (-(-k // MM), -(-m // MM)))
        assert np.allclose(dw.reshape(m, k), dw0.reshape(m, k) + DY.T @ X, rtol=0, atol=1e-9), "backward_weight_bf16"
    # The rounding itself: ties to even, and the f32 product of rounded operands differs from the exact one.
    assert bf16(np.float32(1.0 + 2**-8)) == 1.0 and bf16(np.float32(1.0 + 3 * 2**-8)) == 1.0 + 2**-6
    print("linear tensor-core tiles ok")

# ---- runtime_attention.cu ---------------------------------------------------------------------------
MAXD = 256; PL = MAXD // 32

def first_key(i, window): return max(0, i + 1 - window) if window > 0 else 0

def attn_reference(q, k, v, dout, S, T, H, KV, D, window):
    scale = 1.0 / math.sqrt(D)
    Q = q.reshape(S, T, H, D); K = k.reshape(S, T, KV, D); V = v.reshape(S, T, KV, D); DO = dout.reshape(S, T, H, D)
    out = np.zeros_like(Q); lse = np.zeros((S, H, T))
    dq = np.zeros_like(Q); dk = np.zeros_like(K); dv = np.zeros_like(V)
    for s in range(S):
        for h in range(H):
            g = h // (H // KV)
            sc = Q[s, :, h] @ K[s, :, g].T * scale
            mask = np.array([[first_key(i, window) <= j <= i for j in range(T)] for i in range(T)])
            sc = np.where(mask, sc, -np.inf)
            l = np.log(np.exp(sc - sc.max(1, keepdims=True)).sum(1)) + sc.max(1)
            P = np.exp(sc - l[:, None])
            out[s, :, h] = P @ V[s, :, g]; lse[s, h] = l
            dP = DO[s, :, h] @ V[s, :, g].T
            dS = P * (dP - (P * dP).sum(1, keepdims=True))
            dq[s, :, h] = scale * dS @ K[s, :, g]
            dk[s, :, g] += scale * dS.T @ Q[s, :, h]
            dv[s, :, g] += P.T @ DO[s, :, h]
    return out.ravel(), lse.ravel(), dq.ravel(), dk.ravel(), dv.ravel()

def lanes_dims(): return np.arange(32)[:, None] + 32 * np.arange(PL)[None, :]  # [lane, c] -> d

def attention_emulated(q, k, v, dout, S, T, H, KV, D, window):
    scale = 1.0 / math.sqrt(D); dims = lanes_dims(); live = dims < D
    qw, kw = H * D, KV * D
    out = np.full(q.size, np.nan); lse = np.full(S * H * T, np.nan)
    ATT_WARPS = 4; blocks = -(-S * H * T // ATT_WARPS)
    for blk in range(blocks):
        for wib in range(ATT_WARPS):
            warp = (blk * ATT_WARPS * 32 + wib * 32) >> 5
            if warp >= S * H * T: continue
            i = warp % T; sh = warp // T; h = sh % H; s = sh // H; g = h // (H // KV)
            qi = (s * T + i) * qw + h * D; kb = s * T * kw + g * D
            qr = np.where(live, q[np.where(live, qi + dims, 0)], 0.0); acc = np.zeros_like(qr)
            m, l = -np.inf, 0.0
            for j in range(first_key(i, window), i + 1):
                kj = kb + j * kw
                sc = (np.where(live, qr * k[np.where(live, kj + dims, 0)], 0.0)).sum() * scale
                mn = max(m, sc); corr = math.exp(m - mn) if m > -np.inf else 0.0; e = math.exp(sc - mn)
                l = l * corr + e
                acc = np.where(live, acc * corr + e * v[np.where(live, kj + dims, 0)], acc); m = mn
            o = (s * T + i) * qw + h * D
            out[o + dims[live]] = (acc / l)[live]
            lse[(s * H + h) * T + i] = m + math.log(l)
    # backward: dq kernel
    dq = np.zeros(q.size); delta = np.full(S * H * T, np.nan)
    for warp in range(S * H * T):
        i = warp % T; sh = warp // T; h = sh % H; s = sh // H; g = h // (H // KV)
        qoff = (s * T + i) * qw + h * D; kb = s * T * kw + g * D
        qr = np.where(live, q[np.where(live, qoff + dims, 0)], 0.0)
        dor = np.where(live, dout[np.where(live, qoff + dims, 0)], 0.0)
        row = (s * H + h) * T + i; L = lse[row]; j0 = first_key(i, window)
        dsum = 0.0
        for j in range(j0, i + 1):
            kj = kb + j * kw
            a = np.where(live, qr * k[np.where(live, kj + dims, 0)], 0).sum()
            b = np.where(live, dor * v[np.where(live, kj + dims, 0)], 0).sum()
            dsum += math.exp(a * scale - L) * b
        delta[row] = dsum; acc = np.zeros_like(qr)
        for j in range(j0, i + 1):
            kj = kb + j * kw
            a = np.where(live, qr * k[np.where(live, kj + dims, 0)], 0).sum()
            b = np.where(live, dor * v[np.where(live, kj + dims, 0)], 0).sum()
            p = math.exp(a * scale - L); ds = p * (b - dsum)
            acc = np.where(live, acc + ds * k[np.where(live, kj + dims, 0)], acc)
        dq[qoff + dims[live]] += scale * acc[live]
    # dkv kernel
    dk = np.zeros(k.size); dv = np.zeros(v.size); grp = H // KV
    for warp in range(S * KV * T):
        j = warp % T; sg = warp // T; g = sg % KV; s = sg // KV
        koff = (s * T + j) * kw + g * D
        kr = np.where(live, k[np.where(live, koff + dims, 0)], 0.0)
        vr = np.where(live, v[np.where(live, koff + dims, 0)], 0.0)
        dka = np.zeros_like(kr); dva = np.zeros_like(vr)
        i1 = min(T, j + window) if window > 0 else T
        for h in range(g * grp, (g + 1) * grp):
            qb = s * T * qw + h * D; row0 = (s * H + h) * T
            for i in range(j, i1):
                assert first_key(i, window) <= j <= i
                qi = qb + i * qw
                qv = np.where(live, q[np.where(live, qi + dims, 0)], 0.0)
                dov = np.where(live, dout[np.where(live, qi + dims, 0)], 0.0)
                a = (qv * kr).sum(); b = (dov * vr).sum()
                p = math.exp(a * scale - lse[row0 + i]); ds = p * (b - delta[row0 + i])
                dva += p * dov; dka += ds * qv
        dk[koff + dims[live]] += scale * dka[live]; dv[koff + dims[live]] += dva[live]
    return out, lse, dq, dk, dv

def check_attention():
    for S, T, H, KV, D, W in [(2, 7, 4, 2, 12, 0), (1, 9, 6, 2, 40, 3), (2, 5, 2, 1, 33, 1), (1, 6, 3, 3, 8, 10)]:
        q = rng.standard_normal(S * T * H * D); k = rng.standard_normal(S * T * KV * D)
        v = rng.standard_normal(S * T * KV * D); do = rng.standard_normal(S * T * H * D)
        want = attn_reference(q, k, v, do, S, T, H, KV, D, W)
        got = attention_emulated(q, k, v, do, S, T, H, KV, D, W)
        for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want):
            assert not np.isnan(a).any(), name + " not written everywhere"
            assert np.allclose(a, b, atol=1e-10), (name, S, T, H, KV, D, W, np.abs(a - b).max())
    print("attention ok")

# ---- runtime_attention_mma.cu: attention_forward_mma<HD> (tensor cores) ----------------------------------
FA_Q, FA_K = 64, 64

def attention_forward_mma(q, k, v, S, T, H, KV, HD, window, round_p=True):
    scale = np.float32(1.0 / math.sqrt(HD))
    out = np.full(S * T * H * HD, np.nan); lse = np.full(S * H * T, np.nan)
    qw, kw = H * HD, KV * HD
    lane = np.arange(32); g = lane >> 2; t = lane & 3
    rnd = bf16 if round_p else (lambda x: np.asarray(x, np.float64))
    for s in range(S):
        for h in range(H):
            kvh = h // (H // KV)
            for q0 in range(0, T, FA_Q):
                # Q rows of this block as bf16 (zero past the end), [64, HD]
                Qb = np.zeros((FA_Q, HD))
                for r in range(FA_Q):
                    if q0 + r < T: Qb[r] = bf16(q[(s * T + q0 + r) * qw + h * HD:(s * T + q0 + r) * qw + (h + 1) * HD])
                m = np.full((4, 32, 2), -np.inf); l = np.zeros((4, 32, 2)); o = np.zeros((4, HD // 8, 32, 4))
                q_last = min(q0 + FA_Q, T) - 1
                for kb in range(first_key(q0, window) // FA_K, q_last // FA_K + 1):
                    j0 = kb * FA_K
                    Ks = np.full((FA_K, HD + 8), np.nan); Vt = np.full((HD, FA_K + 8), np.nan)
                    for p in range(FA_K * HD // 2):  # the two staging loops, pair by pair
                        key, d = p // (HD // 2), 2 * (p % (HD // 2)); j = j0 + key
                        for o_ in (0, 1):
                            Ks[key, d + o_] = bf16(k[(s * T + j) * kw + kvh * HD + d + o_]) if j < T else 0.0
                        d, key = p % HD, 2 * (p // HD)
                        for o_ in (0, 1):
                            jj = j0 + key + o_
                            Vt[d, key + o_] = bf16(v[(s * T + jj) * kw + kvh * HD + d]) if jj < T else 0.0
                    for w in range(4):
                        r_lo = q0 + w * 16 + g; rows = [r_lo, r_lo + 8]
                        sc = np.zeros((FA_K // 8, 32, 4))
                        for nt in range(FA_K // 8):
                            for ks in range(HD // 16):
                                D = frag_a(Qb, g, t, w * 16, ks * 16) @ frag_b(Ks, g, t, nt * 8, ks * 16)
                                assert not np.isnan(D).any()
                                sc[nt] += c_frag(D, g, t)
                        mx = np.full((32, 2), -np.inf)
                        for nt in range(FA_K // 8):
                            for e in range(4):
                                row = rows[e >> 1]; j = j0 + nt * 8 + 2 * t + (e & 1)
                                fk = np.array([first_key(int(r), window) for r in row])
                                ok = (j <= row) & (j >= fk) & (j < T)
                                sc[nt, :, e] = np.where(ok, sc[nt, :, e] * scale, -np.inf)
                                mx[:, e >> 1] = np.maximum(mx[:, e >> 1], sc[nt, :, e])
                        # quad reduction: lanes 4g..4g+3 share rows
                        mx = mx.reshape(8, 4, 2).max(1).repeat(4, 0)
                        mn = np.maximum(m[w], mx); mu = np.where(mn == -np.inf, 0.0, mn)
                        corr = np.exp(m[w] - mu); m[w] = mn; l[w] *= corr
                        for e in range(4): o[w, :, :, e] *= corr[None, :, e >> 1]
                        P = np.exp(sc - mu[None, :, [0, 0, 1, 1]])  # [nt, lane, e]
                        l[w] += P.reshape(FA_K // 8, 32, 2, 2).sum((0, 3))
                        # P as A fragments, as the kernel packs them from the accumulators:
                        # pa[nt / 2][(nt & 1) 2] = (e 0, e 1), pa[nt / 2][(nt & 1) 2 + 1] = (e 2, e 3)
                        pa = [[None] * 4 for _ in range(FA_K // 16)]
                        for nt in range(FA_K // 8):
                            pa[nt >> 1][(nt & 1) * 2] = (rnd(P[nt, :, 0]), rnd(P[nt, :, 1]))
                            pa[nt >> 1][(nt & 1) * 2 + 1] = (rnd(P[nt, :, 2]), rnd(P[nt, :, 3]))
                        for kk in range(FA_K // 16):
                            A = a_from_regs(pa[kk], g, t)
                            for nd in range(HD // 8):
                                D = A @ frag_b(Vt, g, t, nd * 8, kk * 16)
                                o[w, nd] += c_frag(D, g, t)
                for w in range(4):
                    L = l[w].reshape(8, 4, 2).sum(1).repeat(4, 0)
                    r_lo = q0 + w * 16 + g
                    for nd in range(HD // 8):
                        for e in range(4):
                            row = r_lo + 8 * (e >> 1); d = nd * 8 + 2 * t + (e & 1)
                            ok = row < T
                            out[((s * T + row[ok]) * qw + h * HD + d[ok])] = o[w, nd, ok, e] / L[ok, e >> 1]
                    for r in (0, 1):
                        row = r_lo + 8 * r; ok = (row < T) & (t == 0)
                        lse[(s * H + h) * T + row[ok]] = m[w][ok, r] + np.log(L[ok, r])
    return out, lse

def check_attention_mma():
    for S, T, H, KV, HD, W in [(1, 70, 2, 1, 64, 0), (2, 130, 4, 2, 64, 0), (1, 100, 2, 2, 128, 37), (1, 65, 2, 1, 64, 1)]:
        q = rng.standard_normal(S * T * H * HD); k = rng.standard_normal(S * T * KV * HD)
        v = rng.standard_normal(S * T * KV * HD); do = np.zeros(S * T * H * HD)
        # Against f64 attention of the bf16-rounded q, k, v: exact up to order (and the f32 scale, 1/sqrt(128)
        # rounded: ~3e-8 on these scores) without rounding P ...
        want_out, want_lse = attn_reference(bf16(q), bf16(k), bf16(v), do, S, T, H, KV, HD, W)[:2]
        out, lse = attention_forward_mma(q, k, v, S, T, H, KV, HD, W, round_p=False)
        assert not np.isnan(out).any() and not np.isnan(lse).any(), "not written everywhere"
        assert np.allclose(out, want_out, atol=1e-6) and np.allclose(lse, want_lse, atol=1e-6), (S, T, H, KV, HD, W)
        # ... and within bf16 rounding of P with it (what the tensor cores multiply).
        out, lse = attention_forward_mma(q, k, v, S, T, H, KV, HD, W, round_p=True)
        err = np.abs(out - want_out).max() / np.abs(want_out).max()
        assert err < 1e-2 and np.allclose(lse, want_lse, atol=1e-6), (S, T, H, KV, HD, W, err)
    print("attention tensor-core forward ok")

FB_STEP, FB_DIMS = 32, 64

def fa_stage_rows(base, ld, j0, T, HD, S):
    for p in range(FB_STEP * HD // 2):
        r, d = p // (HD // 2), 2 * (p % (HD // 2)); j = j0 + r
        for o_ in (0, 1): S[r, d + o_] = bf16(base(j, d + o_)) if j < T else 0.0

def fa_stage_cols(base, ld, j0, T, ND, St):
    for p in range(FB_STEP * ND // 2):
        d, r = p % ND, 2 * (p // ND)
        for o_ in (0, 1):
            j = j0 + r + o_
            St[d, r + o_] = bf16(base(j, d)) if j < T else 0.0

def fa_load_a(base, r_lo_block, T, HD):
    """fa_load_a for a warp whose rows start at r_lo_block: the [16, HD] bf16 tile its registers hold."""
    M = np.zeros((16, HD))
    for r in range(16):
        if r_lo_block + r < T: M[r] = bf16(np.array([base(r_lo_block + r, d) for d in range(HD)]))
    return M

def fa_rows_times_rows(Ma, Sm, g, t, HD):
    acc = np.zeros((FB_STEP // 8, 32, 4))
    for nt in range(FB_STEP // 8):
        for ks in range(HD // 16):
            D = frag_a(Ma, g, t, 0, ks * 16) @ frag_b(Sm, g, t, nt * 8, ks * 16)
            assert not np.isnan(D).any()
            acc[nt] += c_frag(D, g, t)
    return acc

def fa_acc_times_cols(x, St, g, t, ND, out, rnd):
    for kk in range(FB_STEP // 16):
        regs = [(rnd(x[2 * kk, :, 0]), rnd(x[2 * kk, :, 1])), (rnd(x[2 * kk, :, 2]), rnd(x[2 * kk, :, 3])),
                (rnd(x[2 * kk + 1, :, 0]), rnd(x[2 * kk + 1, :, 1])), (rnd(x[2 * kk + 1, :, 2]), rnd(x[2 * kk + 1, :, 3]))]
        A = a_from_regs(regs, g, t)
        for nd in range(ND // 8):
            D = A @ frag_b(St, g, t, nd * 8, kk * 16)
            assert not np.isnan(D).any()
            out[nd] += c_frag(D, g, t)

def attention_backward_mma(q, k, v, lse, dout, S, T, H, KV, HD, window, round_p=True):
    scale = np.float32(1.0 / math.sqrt(HD))
    qw, kw = H * HD, KV * HD
    lane = np.arange(32); g = lane >> 2; t = lane & 3
    rnd = bf16 if round_p else (lambda x: np.asarray(x, np.float64))
    dq = np.zeros(S * T * H * HD); dk = np.zeros(S * T * KV * HD); dv = np.zeros(S * T * KV * HD)
    delta = np.full(S * H * T, np.nan)
    for s in range(S):
        for h in range(H):  # ---- attention_backward_dq_mma, blocks (q0, h, s)
            kvh = h // (H // KV)
            Kb = lambda j, d: k[(s * T + j) * kw + kvh * HD + d]
            Vb = lambda j, d: v[(s * T + j) * kw + kvh * HD + d]
            Qb = lambda i, d: q[(s * T + i) * qw + h * HD + d]
            Db = lambda i, d: dout[(s * T + i) * qw + h * HD + d]
            for q0 in range(0, T, FA_Q):
                q_last = min(q0 + FA_Q, T) - 1
                for w in range(4):
                    r_lo = q0 + w * 16 + g; rows = [r_lo, r_lo + 8]
                    L = [np.where(r < T, lse[(s * H + h) * T + np.minimum(r, T - 1)], 0.0) for r in rows]
                    Qa = fa_load_a(Qb, q0 + w * 16, T, HD); Da = fa_load_a(Db, q0 + w * 16, T, HD)
                    dsum = np.zeros((32, 2)); D = np.zeros((32, 2)); acc = np.zeros((HD // 8, 32, 4))
                    for ps in (0, 1):
                        for kb in range(first_key(q0, window) // FB_STEP, q_last // FB_STEP + 1):
                            j0 = kb * FB_STEP
                            Ks = np.full((FB_STEP, HD + 8), np.nan); Vs = np.full((FB_STEP, HD + 8), np.nan)
                            Kt = np.full((HD, FB_STEP + 8), np.nan)
                            fa_stage_rows(Kb, kw, j0, T, HD, Ks); fa_stage_rows(Vb, kw, j0, T, HD, Vs)
                            if ps == 1: fa_stage_cols(Kb, kw, j0, T, HD, Kt)
                            sc = fa_rows_times_rows(Qa, Ks, g, t, HD); dp = fa_rows_times_rows(Da, Vs, g, t, HD)
                            for nt in range(FB_STEP // 8):
                                for e in range(4):
                                    r = e >> 1; row = rows[r]; j = j0 + nt * 8 + 2 * t + (e & 1)
                                    fk = np.array([first_key(int(x), window) for x in row])
                                    ok = (j <= row) & (j >= fk) & (j < T) & (row < T)
                                    p = np.where(ok, np.exp(np.where(ok, sc[nt, :, e] * scale - L[r], 0.0)), 0.0)
                                    if ps == 0: dsum[:, r] += p * dp[nt, :, e]
                                    else: sc[nt, :, e] = p * (dp[nt, :, e] - D[:, r])
                            if ps == 1: fa_acc_times_cols(sc, Kt, g, t, HD, acc, rnd)
                        if ps == 0:
                            D = dsum.reshape(8, 4, 2).sum(1).repeat(4, 0)
                            for r in (0, 1):
                                ok = (rows[r] < T) & (t == 0)
                                delta[(s * H + h) * T + rows[r][ok]] = D[ok, r]
                    for n in range(HD // 8):
                        for e in range(4):
                            row = rows[e >> 1]; d = n * 8 + 2 * t + (e & 1); ok = row < T
                            dq[(s * T + row[ok]) * qw + h * HD + d[ok]] += scale * acc[n, ok, e]
        for gk in range(KV):  # ---- attention_backward_dkv_mma, blocks (key block · halves + half, gk, s)
            grp = H // KV
            Kb = lambda j, d: k[(s * T + j) * kw + gk * HD + d]
            Vb = lambda j, d: v[(s * T + j) * kw + gk * HD + d]
            for bx in range(-(-T // FA_Q) * (HD // FB_DIMS)):
                d0 = (bx % (HD // FB_DIMS)) * FB_DIMS; k0 = (bx // (HD // FB_DIMS)) * FA_Q
                k_last = min(k0 + FA_Q, T) - 1
                i_last = min(T - 1, k_last + window - 1) if window > 0 else T - 1
                for w in range(4):
                    c_lo = k0 + w * 16 + g; cols = [c_lo, c_lo + 8]
                    Ka = fa_load_a(Kb, k0 + w * 16, T, HD); Va = fa_load_a(Vb, k0 + w * 16, T, HD)
                    dka = np.zeros((FB_DIMS // 8, 32, 4)); dva = np.zeros((FB_DIMS // 8, 32, 4))
                    for h in range(gk * grp, (gk + 1) * grp):
                        Qb = lambda i, d: q[(s * T + i) * qw + h * HD + d]
                        Db = lambda i, d: dout[(s * T + i) * qw + h * HD + d]
                        lrow = (s * H + h) * T
                        for ib in range(k0 // FB_STEP, i_last // FB_STEP + 1):
                            i0 = ib * FB_STEP
                            Qs = np.full((FB_STEP, HD + 8), np.nan); Ds = np.full((FB_STEP, HD + 8), np.nan)
                            Qt = np.full((FB_DIMS, FB_STEP + 8), np.nan); Dt = np.full((FB_DIMS, FB_STEP + 8), np.nan)
                            fa_stage_rows(Qb, qw, i0, T, HD, Qs); fa_stage_rows(Db, qw, i0, T, HD, Ds)
                            fa_stage_cols(lambda i, d: Qb(i, d0 + d), qw, i0, T, FB_DIMS, Qt)
                            fa_stage_cols(lambda i, d: Db(i, d0 + d), qw, i0, T, FB_DIMS, Dt)
                            sc = fa_rows_times_rows(Ka, Qs, g, t, HD); dp = fa_rows_times_rows(Va, Ds, g, t, HD)
                            for nt in range(FB_STEP // 8):
                                for e in range(4):
                                    j = cols[e >> 1]; i = i0 + nt * 8 + 2 * t + (e & 1)
                                    fk = np.array([first_key(int(x), window) for x in i])
                                    ok = (j <= i) & (j >= fk) & (i < T) & (j < T)
                                    li = lse[lrow + np.minimum(i, T - 1)]; de = delta[lrow + np.minimum(i, T - 1)]
                                    p = np.where(ok, np.exp(np.where(ok, sc[nt, :, e] * scale - li, 0.0)), 0.0)
                                    sc[nt, :, e] = p
                                    dp[nt, :, e] = np.where(ok, p * (dp[nt, :, e] - de), 0.0)
                            fa_acc_times_cols(sc, Dt, g, t, FB_DIMS, dva, rnd)
                            fa_acc_times_cols(dp, Qt, g, t, FB_DIMS, dka, rnd)
                    for n in range(FB_DIMS // 8):
                        for e in range(4):
                            j = cols[e >> 1]; d = d0 + n * 8 + 2 * t + (e & 1); ok = j < T
                            dk[(s * T + j[ok]) * kw + gk * HD + d[ok]] += scale * dka[n, ok, e]
                            dv[(s * T + j[ok]) * kw + gk * HD + d[ok]] += dva[n, ok, e]
    return dq, dk, dv

def check_attention_backward_mma():
    for S, T, H, KV, HD, W in [(1, 70, 2, 1, 64, 0), (1, 45, 4, 2, 128, 9), (2, 33, 2, 2, 64, 1)]:
        q = rng.standard_normal(S * T * H * HD); k = rng.standard_normal(S * T * KV * HD)
        v = rng.standard_normal(S * T * KV * HD); do = rng.standard_normal(S * T * H * HD)
        want = attn_reference(bf16(q), bf16(k), bf16(v), bf16(do), S, T, H, KV, HD, W)
        lse = want[1]
        got = attention_backward_mma(q, k, v, lse, do, S, T, H, KV, HD, W, round_p=False)
        for name, a, b in zip(["dq", "dk", "dv"], got, want[2:]):
            err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)  # a window of 1: dq = dk = 0
            assert err < 1e-6, (name, S, T, H, KV, HD, W, err)
        got = attention_backward_mma(q, k, v, lse, do, S, T, H, KV, HD, W, round_p=True)
        for name, a, b in zip(["dq", "dk", "dv"], got, want[2:]):
            err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)
            assert err < 2e-2, (name, S, T, H, KV, HD, W, err)
    print("attention tensor-core backward ok")

# ---- runtime_rope.cu ---------------------------------------------------------------------------------
def check_rope():
    # rot_dim < head_dim: partial rotary (the last head_dim - rot_dim values pass through, their table
    # entries cos 1, sin 0, as RopeTable writes them).
    for rows, heads, hd, rot_dim, tokens in [(14, 3, 10, 10, 7), (9, 2, 10, 6, 4)]:
        x = rng.standard_normal(rows * heads * hd)
        cos = rng.standard_normal((tokens, hd)); sin = rng.standard_normal((tokens, hd))
        cos[:, rot_dim:] = 1.0; sin[:, rot_dim:] = 0.0
        cos = cos.ravel(); sin = sin.ravel()
        y = np.zeros_like(x); width = heads * hd; half = rot_dim // 2
        for e in range(x.size):
            row = e // width; i = (e - row * width) % hd; head0 = e - i; t = row % tokens
            rot = -x[head0 + i + half] if i < half else (x[head0 + i - half] if i < rot_dim else 0.0)
            y[e] = x[e] * cos[t * hd + i] + rot * sin[t * hd + i]
        X = x.reshape(rows, heads, hd); C = cos.reshape(tokens, hd)[np.arange(rows) % tokens][:, None]
        Sn = sin.reshape(tokens, hd)[np.arange(rows) % tokens][:, None]
        Xr = X[..., :rot_dim]
        rot = np.concatenate([-Xr[..., half:], Xr[..., :half]], -1)
        want = np.concatenate([Xr * C[..., :rot_dim] + rot * Sn[..., :rot_dim], X[..., rot_dim:]], -1)
        assert np.allclose(y.reshape(rows, heads, hd), want)
    print("rope ok")

# ---- runtime_norm.cu: the weight gradient's row chunks (x − μ: 0 for RMSNorm) -----------------------
def check_rms_chunks():
    for rows, d in [(133, 300), (1, 7), (64, 5), (65, 5)]:
        per = 64; chunks = -(-rows // per)
        x = rng.standard_normal((rows, d)); dy = rng.standard_normal((rows, d)); inv = rng.random(rows)
        mean = rng.standard_normal(rows)
        parts = np.zeros((chunks, d))
        for cy in range(chunks):
            r0 = cy * per; r1 = min(rows, r0 + per)
            parts[cy] = (dy[r0:r1] * (x[r0:r1] - mean[r0:r1, None]) * inv[r0:r1, None]).sum(0)
        assert np.allclose(parts.sum(0), (dy * (x - mean[:, None]) * inv[:, None]).sum(0))
    print("norm chunks ok")

check_linear(); check_linear_mma(); check_attention(); check_attention_mma(); check_attention_backward_mma(); check_rope(); check_rms_chunks()
print("ALL OK")
