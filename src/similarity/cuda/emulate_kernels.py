# emulate_kernels.py — a numpy emulation of the index arithmetic of kernels/*.cu, thread by thread where
# it matters, checked against direct formulas (no GPU needed). mma.m16n8k16 fragment layouts follow the
# PTX ISA. Run: python3 src/similarity/cuda/emulate_kernels.py (needs numpy); prints ALL OK.
import numpy as np, math, sys
rng = np.random.default_rng(0)

def tri_tile(t):
    i = int(np.float32((np.sqrt(np.float32(8.0) * np.float32(t) + np.float32(1.0)) - np.float32(1.0)) * np.float32(0.5)))
    while i*(i+1)//2 > t: i -= 1
    while (i+1)*(i+2)//2 <= t: i += 1
    return i, t - i*(i+1)//2

def check_tri():
    seen = set()
    T = 3000
    for t in list(range(0, 20000)) + list(range(4_000_000, 4_002_000)):
        bi, bj = tri_tile(t)
        assert 0 <= bj <= bi, (t, bi, bj)
        assert bi*(bi+1)//2 + bj == t
    print("tri_tile ok")

def gram_fma(X, n):
    d = X.shape[1]; FM, FK = 64, 16
    K = np.full((n, n), np.nan, np.float32)
    T = -(-n // FM)
    tid = np.arange(256); tx = tid & 15; ty = tid >> 4
    for t in range(T*(T+1)//2):
        bi, bj = tri_tile(t); i0, j0 = bi*FM, bj*FM
        acc = np.zeros((256, 4, 4), np.float32)
        for k0 in range(0, d, FK):
            As = np.zeros((FK, FM+4), np.float32); Bs = np.zeros((FK, FM+4), np.float32)
            for e in range(4):
                idx = tid + e*256; r = idx >> 4; c = idx & 15
                gk = k0 + c; gi = i0 + r; gj = j0 + r
                m = (gi < n) & (gk < d); As[c[m], r[m]] = X[gi[m], gk[m]]
                m = (gj < n) & (gk < d); Bs[c[m], r[m]] = X[gj[m], gk[m]]
            for k in range(FK):
                a = As[k][ty[:, None]*4 + np.arange(4)]; b = Bs[k][tx[:, None]*4 + np.arange(4)]
                acc += a[:, :, None] * b[:, None, :]
        for r in range(4):
            for c in range(4):
                gi = i0 + ty*4 + r; gj = j0 + tx*4 + c
                m = (gi < n) & (gj < n)
                K[gi[m], gj[m]] = acc[m, r, c]
                if bi != bj: K[gj[m], gi[m]] = acc[m, r, c]
    return K

def gram_mma(X, n, vec):
    d = X.shape[1]; MM, MK = 128, 32
    K = np.full((n, n), np.nan, np.float32)
    T = -(-n // MM)
    lane = np.arange(32); g = lane >> 2; tq = lane & 3
    for t in range(T*(T+1)//2):
        bi, bj = tri_tile(t); i0, j0 = bi*MM, bj*MM
        acc = np.zeros((8, 2, 8, 32, 4), np.float32)  # warp, mt, nt, lane, h
        for k0 in range(0, d, MK):
            As = np.zeros((MM, MK+8), np.float32); Bs = np.zeros((MM, MK+8), np.float32)
            for S, r0 in ((As, i0), (Bs, j0)):
                if vec:
                    for tid in range(256):
                        for e in range(2):
                            q = tid + e*256; r = q >> 2; c = (q & 3)*8
                            gr = r0 + r; gk = k0 + c
                            if gr < n and gk < d: S[r, c:c+8] = X[gr, gk:gk+8]
                else:
                    for tid in range(256):
                        for e in range(16):
                            idx = tid + e*256; r = idx >> 5; c = idx & 31
                            gr = r0 + r; gk = k0 + c
                            if gr < n and gk < d: S[r, c] = X[gr, gk]
            for warp in range(8):
                wm, wn = warp & 3, warp >> 2
                for ks in (0, 16):
                    for mt in range(2):
                        r = wm*32 + mt*16 + g
                        # registers as (lo, hi) element pairs per lane
                        a = [np.stack([As[r, ks+2*tq], As[r, ks+2*tq+1]], 1),
                             np.stack([As[r+8, ks+2*tq], As[r+8, ks+2*tq+1]], 1),
                             np.stack([As[r, ks+2*tq+8], As[r, ks+2*tq+9]], 1),
                             np.stack([As[r+8, ks+2*tq+8], As[r+8, ks+2*tq+9]], 1)]
                        # Hardware: rebuild A (16x16) from fragments per PTX layout.
                        A = np.zeros((16, 16), np.float32)
                        for i in range(8):
                            reg, half = i // 2, i & 1
                            row = g if i in (0, 1, 4, 5) else g + 8
                            col = tq*2 + (i & 1) + (8 if i >= 4 else 0)
                            A[row, col] = a[reg][:, half]
                        for nt in range(8):
                            c = wn*64 + nt*8 + g
                            b = [np.stack([Bs[c, ks+2*tq], Bs[c, ks+2*tq+1]], 1),
                                 np.stack([Bs[c, ks+2*tq+8], Bs[c, ks+2*tq+9]], 1)]
                            B = np.zeros((16, 8), np.float32)
                            for i in range(4):
                                reg, half = i // 2, i & 1
                                row = tq*2 + (i & 1) + (8 if i >= 2 else 0)
                                B[row, g] = b[reg][:, half]
                            D = A @ B
                            for i in range(4):
                                row = g + (8 if i >= 2 else 0); col = tq*2 + (i & 1)
                                acc[warp, mt, nt, :, i] += D[row, col]
        for warp in range(8):
            wm, wn = warp & 3, warp >> 2
            for mt in range(2):
                for nt in range(8):
                    for h in range(4):
                        gi = i0 + wm*32 + mt*16 + g + (h >> 1)*8
                        gj = j0 + wn*64 + nt*8 + 2*tq + (h & 1)
                        m = (gi < n) & (gj < n)
                        K[gi[m], gj[m]] = acc[warp, mt, nt, m, h]
                        if bi != bj: K[gj[m], gi[m]] = acc[warp, mt, nt, m, h]
    return K

def centre_pack_kernel(K, n, unbiased):
    # gram_row_sums
    Kd = K.astype(np.float64)
    rs = np.array([sum(Kd[i, j] for j in range(n) if not (unbiased and i == j)) for i in range(n)])
    # centre_offsets
    dn = float(n); scale = 1/(dn-2) if unbiased else 1/dn
    total = (rs*scale).sum()
    shift = total/(2*(dn-1)) if unbiased else 0.5*total/dn
    c = rs*scale - shift
    P = n*(n+1)//2
    G = np.empty(P, np.float32)
    for p in range(P):
        i = int((math.sqrt(8.0*p+1.0)-1.0)*0.5)
        while i*(i+1)//2 > p: i -= 1
        while (i+1)*(i+2)//2 <= p: i += 1
        j = p - i*(i+1)//2
        v = float(K[i, j]) - c[i] - c[j]
        if i == j: v = 0.0 if unbiased else v*0.70710678118654752440
        G[p] = v
    return G

def ref_centre(K, n, unbiased):
    K = K.astype(np.float64).copy()
    if unbiased:
        np.fill_diagonal(K, 0); m = K.sum(1)/(n-2); m -= m.sum()/(2*(n-1))
        K = K - m[:, None] - m[None, :]; np.fill_diagonal(K, 0)
    else:
        H = np.eye(n) - 1/n; K = H @ K @ H
    return K

def hsic_pairs(GA, la, GB, lb, P, chunk, out, ldo, row0, col0, tri):
    PT = PK = 32
    tiles = (-(-la//PT))*(-(-la//PT)+1)//2 if tri else (-(-la//PT))*(-(-lb//PT))
    tid = np.arange(256); tx = tid & 15; ty = tid >> 4
    for y in range(tiles):
        if tri: ta, tb = tri_tile(y)
        else:
            ntb = -(-lb//PT); ta, tb = y // ntb, y % ntb
        a0, b0 = ta*PT, tb*PT
        for x in range(-(-P//chunk)):
            pb = x*chunk; pe = min(P, pb+chunk)
            acc = np.zeros((256, 2, 2))
            for p0 in range(pb, pe, PK):
                As = np.zeros((PT, PK+1), np.float32); Bs = np.zeros((PT, PK+1), np.float32)
                for e in range(4):
                    idx = tid + e*256; r = idx >> 5; k = idx & 31; p = p0 + k
                    m = (a0 + r < la) & (p < pe); As[r[m], k[m]] = GA[a0 + r[m], p[m]]
                    m = (b0 + r < lb) & (p < pe); Bs[r[m], k[m]] = GB[b0 + r[m], p[m]]
                s = np.zeros((256, 2, 2), np.float32)
                for rr in range(2):
                    for qq in range(2):
                        s[:, rr, qq] = (As[ty*2+rr, :PK] * Bs[tx*2+qq, :PK]).sum(1)
                acc += s
            for rr in range(2):
                for qq in range(2):
                    a = a0 + ty*2 + rr; b = b0 + tx*2 + qq
                    m = (a < la) & (b < lb)
                    np.add.at(out, ((row0 + a[m]), col0 + b[m]), acc[m, rr, qq])

def key(f):
    u = np.asarray(f, np.float32).view(np.uint32).astype(np.uint64)
    return np.where(u & 0x80000000, (~u) & 0xffffffff, u | 0x80000000).astype(np.uint64)
def key_float(k):
    k = np.uint64(k)
    u = (k & 0x7fffffff) if (k & 0x80000000) else ((~k) & 0xffffffff)
    return np.array([u], np.uint64).astype(np.uint32).view(np.float32)[0]

def radix_median(v):
    nn = v.size; keys = key(v)
    hi = nn//2; lo = hi if nn % 2 == 1 else hi-1
    res = []
    for rank in (lo, hi):
        prefix = 0; mask = 0
        for shift, bits in ((21, 11), (10, 11), (0, 10)):
            sel = keys[(keys & mask) == prefix]
            h = np.bincount(((sel >> shift) & ((1 << bits) - 1)).astype(np.int64), minlength=2048)
            nb = 1 << bits; before = 0; digit = nb-1
            for b in range(nb):
                if rank < before + h[b]: digit = b; break
                before += h[b]
            prefix |= digit << shift; mask |= (nb-1) << shift; rank -= before
        res.append(key_float(prefix))
    return 0.5*(float(res[0]) + float(res[1]))

def column_centre_to_f16(Xbits_f32):
    """column_centre + column_to_f16 (centre_columns.cu) on one 16-bit layer given as its values in f32:
    f64 column means rounded to bf16 through f32 (centre_of: on the values' grid), the largest column range
    → e, f16((x − μ)·2^e). Returns (the f16 values as f64, e)."""
    mu = Xbits_f32.astype(np.float64).mean(0)
    bits = mu.astype(np.float32).view(np.uint32).astype(np.uint64)
    mu = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    dev = (Xbits_f32.astype(np.float64) - mu).astype(np.float32)
    rng_ = max(float(np.maximum(dev.max(0), -dev.min(0)).max()), 0.0)
    if rng_ > 0:
        _, k = math.frexp(rng_); e = max(-60, min(60, 14 - k))
    else:
        e = 0 if rng_ != 0 else 14
    vals = np.ldexp((Xbits_f32.astype(np.float64) - mu), e).astype(np.float32).astype(np.float16)
    assert np.isfinite(vals).all()
    return vals.astype(np.float64), e

def cross_f64(Z):
    """feature_cross.cu's cross_f64, block by block: the staging index map (idx = tid + e·256 → row idx>>6,
    column idx&63 of an 8-row step), the 4×4 per-thread outputs; only tiles bj ≤ bi."""
    n, D = Z.shape; CT, CK = 64, 8
    C = np.full((D, D), np.nan)
    T = -(-D // CT)
    tid = np.arange(256); tx = tid & 15; ty = tid >> 4
    for t in range(T*(T+1)//2):
        bi, bj = tri_tile(t); i0, j0 = bi*CT, bj*CT
        acc = np.zeros((256, 4, 4))
        for r0 in range(0, n, CK):
            As = np.zeros((CK, CT)); Bs = np.zeros((CK, CT))
            for e in range(2):
                idx = tid + e*256; r = idx >> 6; c = idx & 63
                ok = r0 + r < n
                ia = ok & (i0 + c < D); ib = ok & (j0 + c < D)
                As[r[ia], c[ia]] = Z[r0 + r[ia], i0 + c[ia]]
                Bs[r[ib], c[ib]] = Z[r0 + r[ib], j0 + c[ib]]
            for k in range(CK):
                a = As[k][ty[:, None]*4 + np.arange(4)]; b = Bs[k][tx[:, None]*4 + np.arange(4)]
                acc += a[:, :, None] * b[:, None, :]
        for r in range(4):
            for c in range(4):
                i = i0 + ty*4 + r; j = j0 + tx*4 + c; ok = (i < D) & (j < D)
                C[i[ok], j[ok]] = acc[ok, r, c]
    return C

def check_cross():
    for n, D in ((5, 3), (37, 70), (130, 129)):
        Z = rng.standard_normal((n, D))
        C = cross_f64(Z); R = Z.T @ Z
        il = np.tril_indices(D)
        assert not np.isnan(C[il]).any()
        err = np.abs(C[il] - R[il]).max() / np.abs(R).max()
        print("cross_f64", n, D, err); assert err < 1e-13

def ldmatrix_x4(S, addr_rc):
    """PTX ldmatrix.m8n8.x4 (b16): lanes 8m..8m+7 give the row addresses (row, col) of matrix m; lane l
    receives, in register m, the elements (row l//4 of matrix m, columns 2(l%4), 2(l%4)+1)."""
    regs = np.zeros((4, 32, 2), S.dtype)
    for m in range(4):
        for lane in range(32):
            r, c = addr_rc[8*m + lane // 4]
            regs[m, lane] = S[r, c + 2*(lane % 4): c + 2*(lane % 4) + 2]
    return regs

def check_gram_mma_pipelined_fragments():
    """gram_mma_pipelined's ldmatrix.x4 addresses give, lane by lane, the same A and B fragments as
    gram_mma's 32-bit shared loads (which the emulation of gram_mma above checks against X·Xᵀ)."""
    S = rng.standard_normal((128, 40)).astype(np.float32)
    lane = np.arange(32); g = lane >> 2; tq = lane & 3
    pair = lambda r, c: np.stack([S[r, c], S[r, c+1]], 1)
    for warp in range(8):
        wm, wn = warp & 3, warp >> 2
        for ks in (0, 16):
            for mt in range(2):
                r = wm*32 + mt*16 + g
                want = [pair(r, ks+2*tq), pair(r+8, ks+2*tq), pair(r, ks+2*tq+8), pair(r+8, ks+2*tq+8)]
                addr = [(wm*32 + mt*16 + (l & 15), ks + (l >> 4)*8) for l in range(32)]
                got = ldmatrix_x4(S, addr)
                for k in range(4): assert np.array_equal(got[k], want[k]), ("A", warp, ks, mt, k)
            for npair in range(4):
                addr = [(wn*64 + npair*16 + (l & 7) + ((l >> 4) << 3), ks + ((l >> 3) & 1)*8) for l in range(32)]
                got = ldmatrix_x4(S, addr)
                for half, nt in ((0, 2*npair), (1, 2*npair + 1)):
                    c = wn*64 + nt*8 + g
                    want = [pair(c, ks+2*tq), pair(c, ks+2*tq+8)]
                    assert np.array_equal(got[2*half], want[0]) and np.array_equal(got[2*half+1], want[1]), ("B", warp, ks, npair)
    # Bank groups of one 8x8 matrix's row addresses: rows 80 bytes apart, 16-byte reads → distinct.
    assert len({(r*80) % 128 // 16 for r in range(8)}) == 8
    print("gram_mma_pipelined fragments ok")

def check_large_mean_centring():
    """LLM-like bf16 activations (per-feature means ~100, a few features ~5000): the kernels' path (centre,
    f16 with a power-of-two scale, Gram, centre, unscale by 2^(−2e)) against the f64 CKA of the stored
    values, both estimators' centring (biased shown; the scale cancels the same way in both)."""
    def bf16(a):
        b = np.asarray(a, np.float32).view(np.uint32)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        return b.view(np.float32)
    def cka(K, L):
        n = K.shape[0]; H = np.eye(n) - 1.0 / n
        K = H @ K @ H; L = H @ L @ H
        return (K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum())
    worst = 0.0
    for n, d in ((64, 96), (256, 1024)):
        means = 100 + rng.uniform(-20, 20, d); means[::40] = 5000
        base = rng.standard_normal((n, d))
        X = bf16(means + base); Y = bf16(means + 0.7 * base + 0.7 * rng.standard_normal((n, d)))
        want = cka(X.astype(np.float64) @ X.T.astype(np.float64), Y.astype(np.float64) @ Y.T.astype(np.float64))
        xs, ex = column_centre_to_f16(X); ys, ey = column_centre_to_f16(Y)
        # Tensor-core Gram: f16 products exact in f32, f32 accumulation.
        Kx = (xs.astype(np.float32) @ xs.T.astype(np.float32)).astype(np.float64) * 2.0 ** (-2 * ex)
        Ky = (ys.astype(np.float32) @ ys.T.astype(np.float32)).astype(np.float64) * 2.0 ** (-2 * ey)
        got = cka(Kx, Ky)
        raw = cka((X @ X.T).astype(np.float64), (Y @ Y.T).astype(np.float64))  # no centring first, f32 Gram
        print("large-mean centring", n, d, "e", ex, "|ΔCKA|", abs(got - want), "(raw f32 Gram:", abs(raw - want), ")")
        assert abs(got - want) < 1e-5 and abs(raw - want) > 1e-5
        worst = max(worst, abs(got - want))
    return worst

def main():
    check_tri()
    for n, d in ((37, 5), (70, 33), (130, 17)):
        X = rng.standard_normal((n, d)).astype(np.float32) + 0.5
        K = gram_fma(X, n); R = X.astype(np.float64) @ X.T.astype(np.float64)
        assert not np.isnan(K).any(); print("gram_fma", n, d, np.abs(K-R).max()/np.abs(R).max())
    for n, d, vec in ((37, 8, True), (150, 40, True), (150, 33, False), (131, 1, False), (260, 16, True)):
        X = rng.standard_normal((n, d)).astype(np.float32)
        K = gram_mma(X, n, vec); R = X.astype(np.float64) @ X.T.astype(np.float64)
        assert not np.isnan(K).any(); print("gram_mma", n, d, vec, np.abs(K-R).max()/np.abs(R).max())
    for n in (4, 5, 23):
        X = rng.standard_normal((n, 3)) + 1
        K = (X @ X.T).astype(np.float32)
        for unb in (True, False):
            G = centre_pack_kernel(K, n, unb); R = ref_centre(K, n, unb)
            # ⟨K̃,K̃⟩ from packing: 2·|G|² must equal |R|²
            err = abs(2*(G.astype(np.float64)**2).sum() - (R**2).sum())/(R**2).sum()
            il = np.tril_indices(n); Rp = R[il].copy(); Rp[[i*(i+1)//2+i for i in range(n)]] *= 0.70710678118654752440
            print("centre", n, unb, err, np.abs(G - Rp).max())
            assert err < 1e-6 and np.abs(G-Rp).max() < 1e-4
    # pairs: tri and cross
    L, P = 70, 1000
    G = rng.standard_normal((L, P)).astype(np.float32)
    out = np.zeros((L, L)); hsic_pairs(G, L, G, L, P, 256, out, L, 0, 0, True)
    R = G.astype(np.float64) @ G.T.astype(np.float64)
    il = np.tril_indices(L); print("pairs tri", np.abs(out[il] - R[il]).max())
    assert np.abs(out[il]-R[il]).max() < 1e-3
    out = np.zeros((L, L)); blk = 30
    # blocks of 30: emulate the host loop
    for a in range(0, L, blk):
        a1 = min(L, a+blk)
        hsic_pairs(G[a:a1], a1-a, G[a:a1], a1-a, P, 320, out, L, a, a, True)
        for b in range(a+blk, L, blk):
            b1 = min(L, b+blk)
            hsic_pairs(G[b:b1], b1-b, G[a:a1], a1-a, P, 320, out, L, b, a, False)
    print("pairs blocks", np.abs(out[il] - R[il]).max()); assert np.abs(out[il]-R[il]).max() < 1e-3
    for n in (4, 5, 17, 30):
        v = (rng.standard_normal(n*n)**2).astype(np.float32); v[::n+1] = 0; v[3] = -1e-7
        m = radix_median(v); ref = float(np.median(v.astype(np.float64)))
        print("median", n, m, ref); assert m == ref
    check_large_mean_centring()
    check_cross()
    check_gram_mma_pipelined_fragments()
    print("ALL OK")
main()
