package qupath.lib.gui.viewer.overlays

import qupath.lib.gui.viewer.OverlayOptions
import qupath.lib.gui.viewer.QuPathViewer
import qupath.lib.regions.ImageRegion

import java.awt.image.BufferedImage

/**
 * STAND-IN for QuPath's BufferedImageOverlay (not QuPath): the constructor of QuPath 0.4-0.7
 * that draws images over level-0 regions of the viewer's slide. Made with the viewer, it goes
 * away when the viewer opens another image, as QuPath's does.
 */
class BufferedImageOverlay {
    final OverlayOptions options
    final Map<ImageRegion, BufferedImage> regions = new LinkedHashMap<ImageRegion, BufferedImage>()

    BufferedImageOverlay(QuPathViewer viewer, OverlayOptions options, Map<ImageRegion, BufferedImage> regions) {
        this.options = options
        this.regions.putAll(regions)
        viewer.removeOnImageChange(this)
    }

    Map<ImageRegion, BufferedImage> getRegionMap() { return regions }
}
